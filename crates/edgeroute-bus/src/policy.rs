//! The routing policy over the bus, pushed once by an admin and followed by every discovery
//! replica (like xDS): the text travels as is, each replica parses, validates and applies it on
//! its own, and reports back what it did.
//!
//! Layout on NATS:
//! - the text: JetStream KV bucket `<policy_bucket>` (default `edgeroute_policy`), key
//!   [`POLICY_KEY`], value = the TOML document, at most `max_policy_bytes` (default 1 MiB),
//!   history `policy_history` (default 5). A replica watches the key *with history*, so one
//!   that starts late (or reconnects) gets the current text at once, then every update;
//!   the KV revision names each text;
//! - the acknowledgements: core subject `<policy_status_prefix>.<replica>` (default
//!   `edgeroute.policy.status.<replica>`), one JSON [`PolicyStatus`] per text considered.
//!   At most once (core pub/sub): an acknowledgement is a convenience for the pusher; the
//!   replica's `/health` and `/metrics` are the record.
//!
//! Embedded: a tokio `watch` channel (the latest text and its revision, a counter) and a
//! broadcast channel for the statuses, with the same size limits.
//!
//! Who may use what (the server enforces it, [`crate::credentials`]): only the `admin` role may
//! put the text (and create the bucket); a discovery replica may read and watch it and publish
//! statuses; a node may do neither.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};

use crate::BusError;

/// The KV key holding the policy in force.
pub const POLICY_KEY: &str = "current";

/// Largest encoded [`PolicyStatus`]; a longer refusal reason is cut to fit.
pub const MAX_STATUS_BYTES: usize = 8 * 1024;

/// One text of the policy as the bus holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyUpdate {
    /// Names this text on this bus: the KV revision (NATS) or a counter (embedded); grows
    /// with every put.
    pub revision: u64,
    /// The document, or why it could not be read off the bus (over the size limit, not
    /// UTF-8): a replica refuses such a text as it refuses an invalid one.
    pub text: Result<String, String>,
}

/// What a replica did with a text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyResult {
    Applied,
    Refused,
}

impl PolicyResult {
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyResult::Applied => "applied",
            PolicyResult::Refused => "refused",
        }
    }
}

/// A replica's acknowledgement of one text (`edgeroute.policy.status.<replica>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyStatus {
    /// The replica (`[discovery] id`); also the subject's last token.
    pub replica: String,
    /// The text's [`PolicyUpdate::revision`].
    pub revision: u64,
    /// The policy version in force on the replica after considering it (`""`: none).
    pub version: String,
    pub result: PolicyResult,
    /// Why it was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl PolicyStatus {
    /// Encodes within [`MAX_STATUS_BYTES`], cutting the reason if it must.
    pub(crate) fn encode(&self) -> Result<Vec<u8>, BusError> {
        crate::wire::check_token("replica", &self.replica)?;
        let mut s = self.clone();
        loop {
            let bytes = serde_json::to_vec(&s)
                .map_err(|source| BusError::Encode { what: "policy status", source })?;
            if bytes.len() <= MAX_STATUS_BYTES {
                return Ok(bytes);
            }
            match &mut s.reason {
                Some(r) if !r.is_empty() => {
                    let keep = r.len().saturating_sub(bytes.len() - MAX_STATUS_BYTES + 4);
                    let mut cut = keep.min(r.len());
                    while !r.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    r.truncate(cut);
                    r.push('…');
                }
                _ => {
                    return Err(BusError::TooLarge {
                        what: "policy status",
                        bytes: bytes.len(),
                        limit: MAX_STATUS_BYTES,
                    });
                }
            }
        }
    }

    /// Decodes a status received on `subject`'s replica token; `None` for anything malformed,
    /// oversized, or naming another replica than its subject.
    pub(crate) fn decode(subject_replica: &str, payload: &[u8]) -> Option<PolicyStatus> {
        if payload.len() > MAX_STATUS_BYTES {
            return None;
        }
        let s: PolicyStatus = serde_json::from_slice(payload).ok()?;
        (s.replica == subject_replica).then_some(s)
    }
}

/// Checks a text before it is put: within `max` bytes.
pub(crate) fn check_size(text: &str, max: usize) -> Result<(), BusError> {
    if text.len() > max {
        return Err(BusError::TooLarge { what: "policy", bytes: text.len(), limit: max });
    }
    Ok(())
}

/// Reads a value off the bus: the text, or why it cannot be one.
pub(crate) fn decode_text(value: &[u8], max: usize) -> Result<String, String> {
    if value.len() > max {
        return Err(format!("{} bytes, over the {max}-byte limit (max_policy_bytes)", value.len()));
    }
    String::from_utf8(value.to_vec()).map_err(|_| "the policy text is not UTF-8".to_owned())
}

/// The embedded transport's policy channels.
#[derive(Debug)]
pub(crate) struct InProcessPolicy {
    current: watch::Sender<Option<Arc<(u64, String)>>>,
    statuses: broadcast::Sender<PolicyStatus>,
}

impl InProcessPolicy {
    pub(crate) fn new(capacity: usize) -> Self {
        let (current, _) = watch::channel(None);
        let (statuses, _) = broadcast::channel(capacity.max(1));
        InProcessPolicy { current, statuses }
    }

    pub(crate) fn put(&self, text: &str, max: usize) -> Result<u64, BusError> {
        check_size(text, max)?;
        let mut revision = 0;
        self.current.send_modify(|cur| {
            revision = cur.as_ref().map_or(0, |c| c.0) + 1;
            *cur = Some(Arc::new((revision, text.to_owned())));
        });
        Ok(revision)
    }

    pub(crate) fn watch(&self) -> PolicyWatch {
        PolicyWatch { inner: WatchInner::InProcess(self.current.subscribe()), last: 0 }
    }

    pub(crate) fn publish_status(&self, status: &PolicyStatus) -> Result<(), BusError> {
        // Same limits as on NATS.
        let bytes = status.encode()?;
        if let Some(s) = PolicyStatus::decode(&status.replica, &bytes) {
            // No receiver is fine: nobody is waiting for acknowledgements.
            let _ = self.statuses.send(s);
        }
        Ok(())
    }

    pub(crate) fn statuses(&self) -> PolicyStatuses {
        PolicyStatuses { inner: StatusesInner::InProcess(self.statuses.subscribe()) }
    }
}

enum WatchInner {
    InProcess(watch::Receiver<Option<Arc<(u64, String)>>>),
    // Boxed: the watch is large, and one is held per replica.
    Nats { watch: Box<async_nats::jetstream::kv::Watch>, max: usize },
}

/// The policy texts as they come: the current one first (if any), then each new one. Ends
/// when the bus goes away (NATS: the watch broke; watch again, the current text comes first).
pub struct PolicyWatch {
    inner: WatchInner,
    /// The last revision yielded: nothing older or equal is yielded again.
    last: u64,
}

impl std::fmt::Debug for PolicyWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyWatch").field("last", &self.last).finish_non_exhaustive()
    }
}

impl PolicyWatch {
    pub(crate) fn nats(watch: async_nats::jetstream::kv::Watch, max: usize) -> Self {
        PolicyWatch { inner: WatchInner::Nats { watch: Box::new(watch), max }, last: 0 }
    }

    /// The next text, or `None` when the watch ended.
    pub async fn next(&mut self) -> Option<PolicyUpdate> {
        use async_nats::jetstream::kv::Operation;
        use futures_util::StreamExt;
        loop {
            match &mut self.inner {
                WatchInner::InProcess(rx) => {
                    let current = rx.borrow_and_update().clone();
                    if let Some(c) = current
                        && c.0 > self.last
                    {
                        self.last = c.0;
                        return Some(PolicyUpdate { revision: c.0, text: Ok(c.1.clone()) });
                    }
                    rx.changed().await.ok()?;
                }
                WatchInner::Nats { watch, max } => {
                    let entry = match watch.next().await? {
                        Ok(e) => e,
                        Err(e) => {
                            tracing::warn!(error = %e, "policy watch failed");
                            return None;
                        }
                    };
                    // Deletes are refused by the bucket (deny_delete); nothing else replaces
                    // the policy in force.
                    if entry.operation != Operation::Put || entry.revision <= self.last {
                        continue;
                    }
                    self.last = entry.revision;
                    return Some(PolicyUpdate {
                        revision: entry.revision,
                        text: decode_text(&entry.value, *max),
                    });
                }
            }
        }
    }
}

enum StatusesInner {
    InProcess(broadcast::Receiver<PolicyStatus>),
    Nats { sub: async_nats::Subscriber, prefix: String },
}

/// Every replica's acknowledgements from now on (malformed or mislabelled ones skipped).
pub struct PolicyStatuses {
    inner: StatusesInner,
}

impl std::fmt::Debug for PolicyStatuses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PolicyStatuses")
    }
}

impl PolicyStatuses {
    pub(crate) fn nats(sub: async_nats::Subscriber, prefix: &str) -> Self {
        PolicyStatuses { inner: StatusesInner::Nats { sub, prefix: format!("{prefix}.") } }
    }

    /// The acknowledgements of `revision` from `replicas` distinct replicas (the first of
    /// each), in arrival order, or as many as arrived within `within`. Others (older
    /// revisions, repeats) are skipped.
    pub async fn collect(
        &mut self,
        revision: u64,
        replicas: usize,
        within: std::time::Duration,
    ) -> Vec<PolicyStatus> {
        let mut got: Vec<PolicyStatus> = Vec::with_capacity(replicas);
        let deadline = tokio::time::Instant::now() + within;
        while got.len() < replicas {
            let Ok(Some(s)) = tokio::time::timeout_at(deadline, self.next()).await else {
                break;
            };
            if s.revision == revision && !got.iter().any(|g| g.replica == s.replica) {
                got.push(s);
            }
        }
        got
    }

    /// The next acknowledgement, or `None` when the subscription ended.
    pub async fn next(&mut self) -> Option<PolicyStatus> {
        use futures_util::StreamExt;
        loop {
            match &mut self.inner {
                StatusesInner::InProcess(rx) => match rx.recv().await {
                    Ok(s) => return Some(s),
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
                StatusesInner::Nats { sub, prefix } => {
                    let msg = sub.next().await?;
                    let Some(replica) = msg.subject.as_str().strip_prefix(prefix.as_str()) else {
                        continue;
                    };
                    if let Some(s) = PolicyStatus::decode(replica, &msg.payload) {
                        return Some(s);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(reason: Option<String>) -> PolicyStatus {
        PolicyStatus {
            replica: "disc-1".into(),
            revision: 3,
            version: "p1".into(),
            result: PolicyResult::Refused,
            reason,
        }
    }

    #[test]
    fn a_status_round_trips_and_a_long_reason_is_cut_to_fit() {
        let s = status(Some("line 3: unknown field".into()));
        let bytes = s.encode().unwrap();
        assert_eq!(PolicyStatus::decode("disc-1", &bytes), Some(s));
        let long = status(Some("é".repeat(MAX_STATUS_BYTES)));
        let bytes = long.encode().unwrap();
        assert!(bytes.len() <= MAX_STATUS_BYTES);
        let back = PolicyStatus::decode("disc-1", &bytes).unwrap();
        assert!(back.reason.unwrap().ends_with('…'));
    }

    #[test]
    fn a_status_naming_another_replica_than_its_subject_is_skipped() {
        let bytes = status(None).encode().unwrap();
        assert_eq!(PolicyStatus::decode("disc-2", &bytes), None);
        assert_eq!(PolicyStatus::decode("disc-1", b"{\"replica\":1}"), None);
        let bad = PolicyStatus { replica: "a.>".into(), ..status(None) };
        assert!(bad.encode().is_err());
    }

    #[test]
    fn texts_over_the_limit_or_not_utf8_are_named_as_such() {
        assert!(check_size("abc", 2).is_err());
        check_size("ab", 2).unwrap();
        assert!(decode_text(b"abc", 2).unwrap_err().contains("max_policy_bytes"));
        assert!(decode_text(&[0xff, 0xfe], 10).unwrap_err().contains("UTF-8"));
        assert_eq!(decode_text(b"ok", 10).unwrap(), "ok");
    }

    #[tokio::test]
    async fn the_embedded_watch_gives_the_current_text_first_then_each_new_one() {
        let p = InProcessPolicy::new(8);
        assert_eq!(p.put("a", 10).unwrap(), 1);
        assert_eq!(p.put("b", 10).unwrap(), 2);
        let mut w = p.watch();
        assert_eq!(w.next().await, Some(PolicyUpdate { revision: 2, text: Ok("b".into()) }));
        assert!(p.put("too long", 3).is_err());
        p.put("c", 10).unwrap();
        assert_eq!(w.next().await, Some(PolicyUpdate { revision: 3, text: Ok("c".into()) }));
        let mut acks = p.statuses();
        p.publish_status(&status(None)).unwrap();
        assert_eq!(acks.next().await, Some(status(None)));
        // Collecting: one per replica, of the revision asked, within the time given.
        let other = PolicyStatus { revision: 2, ..status(None) };
        let second = PolicyStatus { replica: "disc-2".into(), ..status(None) };
        for s in [&other, &status(None), &status(None), &second] {
            p.publish_status(s).unwrap();
        }
        let ms = std::time::Duration::from_millis;
        assert_eq!(acks.collect(3, 2, ms(500)).await, [status(None), second.clone()]);
        p.publish_status(&second).unwrap();
        assert_eq!(acks.collect(3, 2, ms(50)).await, [second], "as many as arrived in time");
    }
}
