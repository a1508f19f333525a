//! One classified error (pingora's model): which side failed, whether the caller may retry,
//! and every attempt the SDK made on the way.

use std::fmt;
use std::time::Duration;

/// Where a failure came from: the fleet's one classification ([`edgeroute_proto::Fault`]).
pub use edgeroute_proto::Side;

/// One attempt of a request on one node, as the ladder saw it end.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptReport {
    pub node: String,
    pub side: Side,
    pub what: String,
    /// From the attempt's start to its end.
    pub after: Duration,
    /// Started as a hedge (a race against a late first answer).
    pub hedge: bool,
}

/// The attempts behind an error, in the order they ended.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Attempts(pub Vec<AttemptReport>);

impl fmt::Display for Attempts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("no attempt");
        }
        for (i, a) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            let hedge = if a.hedge { " (hedge)" } else { "" };
            write!(f, "{}{hedge}: {} [{}, {} ms]", a.node, a.what, a.side, a.after.as_millis())?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ClientError {
    #[error("discovery unreachable and no usable cached list: {0}")]
    Discovery(String),
    /// Discovery knows no node that serves the model (after placement misses, asked again).
    #[error("no candidate for model `{model}`: {reason}")]
    NoCandidates { model: String, reason: String },
    /// The node refused the request itself (a client error): returned as is, never retried.
    #[error("node `{node}` answered {status}: {body}")]
    Api { node: String, status: u16, body: String },
    #[error("every candidate failed: {0}")]
    Exhausted(Attempts),
    #[error("retry budget spent: {0}")]
    BudgetSpent(Attempts),
    /// A stream failed after tokens were delivered and no node could continue it.
    #[error("stream cut and not continued: {0}")]
    StreamCut(Attempts),
    #[error("invalid request: {0}")]
    Invalid(String),
    /// Every node that could serve the request is at its capacity (its slots, all taken by
    /// this client's requests: `respect_node_capacity`) and none freed one in time. Not the
    /// nodes' fault: a proxy answers 503 with `Retry-After`.
    #[error("every node for model `{model}` is full: {reason} ({attempts})")]
    FleetSaturated {
        model: String,
        /// When a slot is expected free: the soonest expected answer of the full nodes.
        retry_after_ms: u64,
        reason: String,
        attempts: Attempts,
    },
    /// The bearer token would travel in clear text: `url` is not `https://` and its host is not
    /// loopback. Serve it over https, or set `allow_plaintext` for a private network.
    #[error(
        "refusing to send the bearer token over plaintext to `{url}`: use https:// (or a loopback \
         address), or set allow_plaintext (edgeroute proxy --allow-plaintext) for a private network"
    )]
    PlaintextToken { url: String },
}

impl ClientError {
    /// Which side failed.
    pub fn side(&self) -> Side {
        match self {
            ClientError::Api { .. }
            | ClientError::Invalid(_)
            | ClientError::PlaintextToken { .. }
            | ClientError::NoCandidates { .. } => Side::Caller,
            ClientError::Discovery(_) => Side::Network,
            ClientError::Exhausted(_)
            | ClientError::BudgetSpent(_)
            | ClientError::StreamCut(_)
            | ClientError::FleetSaturated { .. } => Side::Fleet,
        }
    }

    /// Whether the same request may succeed if the caller sends it again later (the fleet or
    /// the path failed, not the request).
    pub fn retryable(&self) -> bool {
        !matches!(self.side(), Side::Caller)
    }

    /// [`ClientError::side`] and [`ClientError::retryable`] as the fleet's one classification,
    /// as a proxy in front of the SDK reports it in `x-edgeroute-error`.
    pub fn fault(&self) -> edgeroute_proto::Fault {
        edgeroute_proto::Fault::new(self.side(), self.retryable())
    }

    /// Every attempt the SDK made for this request (empty when none was made).
    pub fn attempts(&self) -> &[AttemptReport] {
        match self {
            ClientError::Exhausted(a)
            | ClientError::BudgetSpent(a)
            | ClientError::StreamCut(a)
            | ClientError::FleetSaturated { attempts: a, .. } => &a.0,
            _ => &[],
        }
    }

    /// How long the caller should wait before sending again, when this error says (for a
    /// proxy's `Retry-After`).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ClientError::FleetSaturated { retry_after_ms, .. } => {
                Some(Duration::from_millis(*retry_after_ms))
            }
            _ => None,
        }
    }

    /// The HTTP status a proxy answers with for this error.
    pub fn status(&self) -> u16 {
        match self {
            ClientError::Api { status, .. } => *status,
            ClientError::Invalid(_) | ClientError::PlaintextToken { .. } => 400,
            ClientError::NoCandidates { .. } => 404,
            ClientError::Discovery(_)
            | ClientError::BudgetSpent(_)
            | ClientError::FleetSaturated { .. } => 503,
            ClientError::Exhausted(_) | ClientError::StreamCut(_) => 502,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_say_which_side_failed_and_whether_to_retry() {
        let api = ClientError::Api { node: "n".into(), status: 400, body: "{}".into() };
        assert_eq!((api.side(), api.retryable(), api.status()), (Side::Caller, false, 400));
        let attempts = Attempts(vec![AttemptReport {
            node: "tor-1".into(),
            side: Side::Network,
            what: "connect refused".into(),
            after: Duration::from_millis(3),
            hedge: false,
        }]);
        let e = ClientError::Exhausted(attempts);
        assert_eq!((e.side(), e.retryable(), e.status()), (Side::Fleet, true, 502));
        assert_eq!(e.attempts().len(), 1);
        assert_eq!(e.to_string(), "every candidate failed: tor-1: connect refused [network, 3 ms]");
        let none = ClientError::NoCandidates { model: "m".into(), reason: "r".into() };
        assert_eq!((none.status(), none.retryable()), (404, false));
        assert_eq!(none.retry_after(), None);
        let full = ClientError::FleetSaturated {
            model: "m".into(),
            retry_after_ms: 1500,
            reason: "tor-1 full".into(),
            attempts: Attempts::default(),
        };
        assert_eq!((full.side(), full.retryable(), full.status()), (Side::Fleet, true, 503));
        assert_eq!(full.retry_after(), Some(Duration::from_millis(1500)));
    }
}
