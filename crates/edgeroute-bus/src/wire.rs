//! What travels on the wire: subject names, token rules, and size-limited JSON.
//!
//! Pure functions shared by both transports, so the embedded bus enforces the same rules as
//! NATS: a node id that works in a laptop demo also works across regions.

use edgeroute_proto::topology::{NodeSnapshot, TopologyEvent};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::BusError;

/// Largest event or snapshot accepted, encoded. A node's snapshot holds a few hundred models at
/// most; anything bigger is a bug or an attack, and is rejected rather than buffered.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// Checks one subject token (node id, region, bucket, prefix part). NATS gives `.`, `*`, `>` and
/// whitespace meaning in subjects, so only a conservative alphabet is allowed.
pub fn check_token(what: &'static str, value: &str) -> Result<(), BusError> {
    let ok = edgeroute_proto::names::is_token(value);
    if ok { Ok(()) } else { Err(BusError::InvalidToken { what, value: value.to_owned() }) }
}

/// Checks the tokens of an event and the snapshot it comes with.
pub(crate) fn check_node(node_id: &str, region: &str) -> Result<(), BusError> {
    for (what, v) in [("node id", node_id), ("region", region)] {
        if !edgeroute_proto::names::is_name(v) {
            return Err(BusError::InvalidToken { what, value: v.to_owned() });
        }
    }
    Ok(())
}

/// The subject of a node's events: `<prefix>.<region>.<node_id>`.
pub fn event_subject(prefix: &str, region: &str, node_id: &str) -> String {
    format!("{prefix}.{region}.{node_id}")
}

/// The wildcard a subscriber listens on: every region, every node.
pub fn all_events_subject(prefix: &str) -> String {
    format!("{prefix}.>")
}

/// Encodes with the size limit applied.
pub(crate) fn encode<T: Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, BusError> {
    let bytes = serde_json::to_vec(value).map_err(|source| BusError::Encode { what, source })?;
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(BusError::TooLarge { what, bytes: bytes.len(), limit: MAX_MESSAGE_BYTES });
    }
    Ok(bytes)
}

/// Why an incoming message was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    Oversized,
    Malformed,
}

fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, Rejected> {
    // The size check comes first so a huge payload is never parsed.
    if payload.len() > MAX_MESSAGE_BYTES {
        return Err(Rejected::Oversized);
    }
    serde_json::from_slice(payload).map_err(|_| Rejected::Malformed)
}

/// Decodes an event received on `subject`. The subject's last two tokens must name the event's
/// region and node, so a message cannot speak for a node other than the one it was sent as.
pub fn decode_event(
    prefix: &str,
    subject: &str,
    payload: &[u8],
) -> Result<TopologyEvent, Rejected> {
    let ev: TopologyEvent = decode(payload)?;
    if check_node(&ev.node_id, &ev.region).is_err()
        || subject != event_subject(prefix, &ev.region, &ev.node_id)
    {
        return Err(Rejected::Malformed);
    }
    Ok(ev)
}

/// Decodes a snapshot stored under `key` (its node id).
pub fn decode_snapshot(key: &str, payload: &[u8]) -> Result<NodeSnapshot, Rejected> {
    let snap: NodeSnapshot = decode(payload)?;
    if snap.node_id != key || check_node(&snap.node_id, &snap.region).is_err() {
        return Err(Rejected::Malformed);
    }
    Ok(snap)
}

#[cfg(test)]
mod tests {
    use edgeroute_proto::topology::EventKind;

    use super::*;

    fn ev() -> TopologyEvent {
        TopologyEvent {
            node_id: "tor-1".into(),
            region: "ca_east".into(),
            epoch: 1,
            seq: 1,
            at_ms: 0,
            kind: EventKind::Heartbeat,
        }
    }

    #[test]
    fn tokens_allow_only_the_safe_alphabet() {
        assert!(check_token("t", "tor-1_A").is_ok());
        for bad in ["", "a.b", "a*", ">", "a b", "é", "a\n"] {
            assert!(check_token("t", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn events_round_trip_and_must_match_their_subject() {
        let bytes = encode("event", &ev()).unwrap();
        let subject = event_subject("p", "ca_east", "tor-1");
        assert_eq!(decode_event("p", &subject, &bytes), Ok(ev()));
        assert_eq!(decode_event("p", "p.ca_east.other", &bytes), Err(Rejected::Malformed));
        assert_eq!(decode_event("p", &subject, b"{"), Err(Rejected::Malformed));
        assert_eq!(decode_event("p", &subject, b"{\"seq\":1}"), Err(Rejected::Malformed));
        let huge = vec![b' '; MAX_MESSAGE_BYTES + 1];
        assert_eq!(decode_event("p", &subject, &huge), Err(Rejected::Oversized));
    }

    #[test]
    fn snapshots_must_match_their_key_and_fit() {
        let mut snap = NodeSnapshot::new("n1", "r", "http://n1", 1);
        let bytes = encode("snapshot", &snap).unwrap();
        assert_eq!(decode_snapshot("n1", &bytes), Ok(snap.clone()));
        assert_eq!(decode_snapshot("n2", &bytes), Err(Rejected::Malformed));
        snap.url = "x".repeat(MAX_MESSAGE_BYTES);
        assert!(matches!(encode("snapshot", &snap), Err(BusError::TooLarge { .. })));
    }
}
