//! Rollout state on the bus (`edgeroute rollout`, issue 18): one value per model being rolled
//! out, so that the command can stop and resume, and anyone with admin credentials can watch.
//!
//! Layout on NATS: JetStream KV bucket `<rollout_bucket>` (default `edgeroute_rollouts`), key =
//! the model (a `[A-Za-z0-9_-]` token), value = the driver's JSON, at most
//! [`MAX_ROLLOUT_BYTES`]. Writes are compare-and-set on the KV revision ([`Bus::rollout_put`]
//! with the revision last read), so two drivers of one rollout cannot both advance it: the
//! second one's write fails with [`BusError::Conflict`] and it stops.
//!
//! Embedded: a map behind a mutex with the same revisions and limits.
//!
//! Who may (the server enforces it, [`crate::credentials`]): only the `admin` role reads and
//! writes the bucket; nodes, discovery replicas and routers never see it.
//!
//! [`Bus::rollout_put`]: crate::Bus::rollout_put

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use crate::BusError;
use crate::wire::check_token;

/// The largest rollout state stored, bytes (NATS's default `max_payload` is 1 MiB).
pub const MAX_ROLLOUT_BYTES: usize = 900 * 1024;

/// Checks a key and a value before they are written.
pub(crate) fn check(key: &str, value: &[u8]) -> Result<(), BusError> {
    check_token("rollout key", key)?;
    if value.len() > MAX_ROLLOUT_BYTES {
        return Err(BusError::TooLarge {
            what: "rollout state",
            bytes: value.len(),
            limit: MAX_ROLLOUT_BYTES,
        });
    }
    Ok(())
}

/// The last revision given, and key → (revision, value): revisions count per store, as a KV
/// stream's sequence does.
type Entries = (u64, BTreeMap<String, (u64, Vec<u8>)>);

/// The embedded transport's rollout store.
#[derive(Debug, Default, Clone)]
pub(crate) struct InProcessRollouts {
    map: Arc<Mutex<Entries>>,
}

impl InProcessRollouts {
    pub(crate) fn get(&self, key: &str) -> Result<Option<(u64, Vec<u8>)>, BusError> {
        check_token("rollout key", key)?;
        let map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(map.1.get(key).cloned())
    }

    pub(crate) fn put(
        &self,
        key: &str,
        value: &[u8],
        expected: Option<u64>,
    ) -> Result<u64, BusError> {
        check(key, value)?;
        let mut guard = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        let (seq, map) = &mut *guard;
        let current = map.get(key).map(|(r, _)| *r);
        if current != expected {
            return Err(BusError::Conflict { what: "rollout state", expected });
        }
        *seq += 1;
        map.insert(key.to_owned(), (*seq, value.to_vec()));
        Ok(*seq)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

    use super::*;

    #[test]
    fn writes_are_compare_and_set_on_the_revision() {
        let s = InProcessRollouts::default();
        assert_eq!(s.get("llama").unwrap(), None);
        let r1 = s.put("llama", b"a", None).unwrap();
        // A second creator loses; so does a writer holding a stale revision.
        assert!(matches!(s.put("llama", b"b", None), Err(BusError::Conflict { .. })));
        let r2 = s.put("llama", b"b", Some(r1)).unwrap();
        assert!(matches!(s.put("llama", b"c", Some(r1)), Err(BusError::Conflict { .. })));
        assert_eq!(s.get("llama").unwrap(), Some((r2, b"b".to_vec())));
        assert!(s.put("a.b", b"x", None).is_err(), "a key that would widen a subject");
        let big = vec![0u8; MAX_ROLLOUT_BYTES + 1];
        assert!(matches!(s.put("big", &big, None), Err(BusError::TooLarge { .. })));
    }
}
