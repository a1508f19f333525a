//! Tokens already verified, so a session's every request does not pay for the signature again.
//!
//! A voice agent sends the same bearer token on every turn; verifying it (two base64 decodes,
//! an HMAC or a public-key check, a JSON parse, the tenant copied into a fresh string) is the
//! same work each time. The cache keeps what verification concluded — the tenant, the scopes,
//! the validity window — keyed by the exact token bytes:
//!
//! - only tokens that passed every check get in; a failure is never cached (so a bad token
//!   costs the full check each time, and cannot evict good ones faster than real traffic);
//! - each entry remembers the key generation it was verified under: a key rotation makes every
//!   older entry a miss, so a removed key stops working at once;
//! - `exp` and `nbf` are checked against the caller's `now` on every hit, with the same leeway;
//! - the presented token is compared to the cached one in constant time (a timing difference
//!   must not reveal how much of a valid token an attacker has guessed), in a slot chosen by a
//!   randomly keyed hash of the token's length and last bytes — its signature's, which nobody
//!   without the key chooses for a token that verifies (collisions cannot be engineered to
//!   evict a tenant);
//! - the size is fixed at start (`auth.verified_cache_entries`, a direct-mapped table) and
//!   tokens over [`MAX_CACHED_TOKEN_BYTES`] are never kept.

use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex};

use crate::claims::Claims;
use crate::scope::Scopes;

/// Longest token the cache keeps; longer ones are verified every time.
pub const MAX_CACHED_TOKEN_BYTES: usize = 2048;

/// What verifying a token established: who it is, what it may do, and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The tenant (`sub`), shared: handing it to a request copies a pointer, not the string.
    pub tenant: Arc<str>,
    pub scope: Scopes,
    /// Audiences, for checks that depend on the route (an admin token's node or region).
    pub aud: Arc<[String]>,
    pub exp: u64,
    pub nbf: Option<u64>,
    /// Where the tenant's requests may be processed (the token's residency claims; `None`:
    /// unrestricted by the token).
    pub residency: Option<Arc<Residency>>,
    /// The token's other scalar claims ([`Claims::attrs`]), for routing rules; `None` when
    /// it has none.
    pub attrs: Option<Arc<std::collections::BTreeMap<String, String>>>,
}

/// A token's residency claims ([`Claims::jurisdictions`], [`Claims::regions`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Residency {
    pub jurisdictions: Option<Vec<String>>,
    pub regions: Option<Vec<String>>,
}

impl Residency {
    /// Whether a node of `region` and `jurisdiction` may process the request: every list the
    /// token carries must name it. A node of unknown jurisdiction fails a jurisdiction list
    /// (fail closed).
    pub fn allows(&self, region: &str, jurisdiction: Option<&str>) -> bool {
        self.jurisdictions
            .as_ref()
            .is_none_or(|js| jurisdiction.is_some_and(|nj| js.iter().any(|j| j == nj)))
            && self.regions.as_ref().is_none_or(|rs| rs.iter().any(|r| r == region))
    }
}

impl From<&Claims> for Verified {
    fn from(c: &Claims) -> Self {
        let residency = (c.jurisdictions.is_some() || c.regions.is_some()).then(|| {
            Arc::new(Residency {
                jurisdictions: c.jurisdictions.clone(),
                regions: c.regions.clone(),
            })
        });
        Verified {
            tenant: Arc::from(c.sub.as_str()),
            scope: c.scope,
            aud: Arc::from(c.aud.as_slice()),
            exp: c.exp,
            nbf: c.nbf,
            residency,
            attrs: (!c.attrs.is_empty()).then(|| Arc::new(c.attrs.clone())),
        }
    }
}

impl Verified {
    /// [`Residency::allows`]; true for a token without residency claims.
    pub fn may_process_in(&self, region: &str, jurisdiction: Option<&str>) -> bool {
        self.residency.as_ref().is_none_or(|r| r.allows(region, jurisdiction))
    }

    /// Whether the validity window holds at `now` (the verifier's rule: valid strictly before
    /// `exp`, not before `nbf`, both widened by `leeway_s`).
    pub fn valid_at(&self, now: u64, leeway_s: u64) -> bool {
        now < self.exp.saturating_add(leeway_s)
            && self.nbf.is_none_or(|nbf| nbf <= now.saturating_add(leeway_s))
    }
}

struct Slot {
    token: Box<[u8]>,
    generation: u64,
    verified: Arc<Verified>,
}

/// How much of a token's end picks its slot.
const HASHED_TAIL_BYTES: usize = 16;

pub(crate) struct TokenCache {
    slots: Box<[Mutex<Option<Slot>>]>,
    hasher: RandomState,
}

impl TokenCache {
    /// A table of `entries` slots, rounded up to a power of two; 0 disables caching.
    pub(crate) fn new(entries: usize) -> Self {
        let n = if entries == 0 { 0 } else { entries.next_power_of_two() };
        TokenCache { slots: (0..n).map(|_| Mutex::new(None)).collect(), hasher: RandomState::new() }
    }

    fn slot(&self, token: &[u8]) -> Option<&Mutex<Option<Slot>>> {
        if self.slots.is_empty() || token.len() > MAX_CACHED_TOKEN_BYTES {
            return None;
        }
        // A token's last bytes are its signature's: unpredictable for every token that gets
        // in (only verified ones do), and hashing them alone costs a fraction of the whole.
        let tail = &token[token.len().saturating_sub(HASHED_TAIL_BYTES)..];
        let i = self.hasher.hash_one((token.len(), tail)) as usize & (self.slots.len() - 1);
        self.slots.get(i)
    }

    /// The cached verification of `token` under key `generation`, if any.
    pub(crate) fn get(&self, token: &str, generation: u64) -> Option<Arc<Verified>> {
        let slot = self.slot(token.as_bytes())?.lock().ok()?;
        let s = slot.as_ref()?;
        (s.generation == generation && constant_time_eq(&s.token, token.as_bytes()))
            .then(|| Arc::clone(&s.verified))
    }

    pub(crate) fn put(&self, token: &str, generation: u64, verified: Arc<Verified>) {
        if let Some(slot) = self.slot(token.as_bytes())
            && let Ok(mut slot) = slot.lock()
        {
            *slot = Some(Slot { token: token.as_bytes().into(), generation, verified });
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.slots.iter().filter(|s| s.lock().is_ok_and(|s| s.is_some())).count()
    }
}

/// Equal-length inputs are compared in time independent of where they differ: every word is
/// read, differences are OR-ed together, and the optimizer is kept from stopping early.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let (wa, wb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail = wa
        .remainder()
        .iter()
        .zip(wb.remainder())
        .fold(0u64, |acc, (x, y)| std::hint::black_box(acc | u64::from(x ^ y)));
    let word = |c: &[u8]| u64::from_ne_bytes(c.try_into().unwrap_or_default());
    let diff = wa.zip(wb).fold(tail, |acc, (x, y)| std::hint::black_box(acc | (word(x) ^ word(y))));
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verified(tenant: &str, exp: u64) -> Arc<Verified> {
        Arc::new(Verified {
            tenant: Arc::from(tenant),
            scope: Scopes::EMPTY,
            aud: Arc::from(Vec::new()),
            exp,
            nbf: None,
            residency: None,
            attrs: None,
        })
    }

    #[test]
    fn residency_lists_must_all_name_the_node_and_unknown_jurisdictions_fail_closed() {
        let eu = Residency { jurisdictions: Some(vec!["eu".into()]), regions: None };
        assert!(eu.allows("fra", Some("eu")));
        assert!(!eu.allows("tor", Some("ca")));
        assert!(!eu.allows("fra", None), "a node that does not say its jurisdiction");
        let fra = Residency { regions: Some(vec!["fra".into()]), ..eu.clone() };
        assert!(fra.allows("fra", Some("eu")) && !fra.allows("ams", Some("eu")));
        let nothing = Residency { jurisdictions: Some(vec![]), regions: None };
        assert!(!nothing.allows("fra", Some("eu")));
        let free = verified("t", 10);
        assert!(free.may_process_in("anywhere", None));
    }

    #[test]
    fn a_hit_needs_the_same_token_and_generation() {
        let c = TokenCache::new(8);
        c.put("aaa.bbb.ccc", 0, verified("t1", 100));
        assert_eq!(c.get("aaa.bbb.ccc", 0).map(|v| v.tenant.to_string()), Some("t1".into()));
        assert!(c.get("aaa.bbb.ccd", 0).is_none(), "one byte differs");
        assert!(c.get("aaa.bbb.cc", 0).is_none(), "a prefix");
        assert!(c.get("aaa.bbb.ccc", 1).is_none(), "keys rotated since");
    }

    #[test]
    fn size_is_fixed_and_long_tokens_are_not_kept() {
        let c = TokenCache::new(5);
        for i in 0..1000 {
            c.put(&format!("token-{i}"), 0, verified("t", 100));
        }
        assert!(c.len() <= 8, "{}", c.len());
        let long = "x".repeat(MAX_CACHED_TOKEN_BYTES + 1);
        let c = TokenCache::new(8);
        c.put(&long, 0, verified("t", 100));
        assert!(c.get(&long, 0).is_none());
        let off = TokenCache::new(0);
        off.put("a", 0, verified("t", 100));
        assert!(off.get("a", 0).is_none());
    }

    #[test]
    fn the_validity_window_is_the_verifiers() {
        let mut v = (*verified("t", 100)).clone();
        assert!(v.valid_at(99, 0));
        assert!(!v.valid_at(100, 0));
        assert!(v.valid_at(129, 30));
        assert!(!v.valid_at(130, 30));
        v.nbf = Some(50);
        assert!(!v.valid_at(49, 0));
        assert!(v.valid_at(20, 30));
    }

    #[test]
    fn comparison_is_exact() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(constant_time_eq(b"", b""));
        // A difference in any byte of any word, whole or partial, of a token-sized input.
        let a: Vec<u8> = (0..151u8).collect();
        assert!(constant_time_eq(&a, &a.clone()));
        for i in 0..a.len() {
            for bit in [0x01, 0x80] {
                let mut b = a.clone();
                b[i] ^= bit;
                assert!(!constant_time_eq(&a, &b), "byte {i}, bit {bit:#x}");
            }
        }
    }

    #[test]
    fn tokens_alike_but_for_their_ends_are_told_apart() {
        let c = TokenCache::new(64);
        let head = "h".repeat(120);
        c.put(&format!("{head}.sig-A"), 0, verified("a", 100));
        assert!(c.get(&format!("{head}.sig-B"), 0).is_none());
        // The same tail after a different head: never the other's verification.
        let t = c.get(&format!("{}.sig-A", "g".repeat(120)), 0);
        assert!(t.is_none());
        assert_eq!(
            c.get(&format!("{head}.sig-A"), 0).map(|v| v.tenant.to_string()),
            Some("a".into())
        );
    }
}
