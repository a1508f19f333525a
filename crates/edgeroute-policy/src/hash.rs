//! The one hash behind sticky canaries: FNV-1a over the bytes, then SplitMix64's finaliser.
//!
//! Written out here rather than taken from `std` because a session must land on the same
//! version whichever discovery replica answers, on whichever platform, after any upgrade:
//! `DefaultHasher` promises none of that. Both halves are fixed published constants, so the
//! value of a key is part of this crate's contract (a test pins a few).

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// A stable 64-bit hash of `parts`, each followed by a 0xff separator (so `("ab", "c")` and
/// `("a", "bc")` differ).
pub fn stable_hash(parts: &[&[u8]]) -> u64 {
    let mut h = FNV_OFFSET;
    for p in parts {
        for &b in *p {
            h ^= u64::from(b);
            h = h.wrapping_mul(FNV_PRIME);
        }
        h ^= 0xff;
        h = h.wrapping_mul(FNV_PRIME);
    }
    mix(h)
}

/// SplitMix64's finaliser: spreads FNV's weak low bits over the whole word.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Maps a hash onto `[0, n)` without modulo bias worth the name (Lemire's multiply-shift).
pub fn bucket(h: u64, n: u64) -> u64 {
    ((u128::from(h) * u128::from(n)) >> 64) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_pinned_across_releases() {
        // Changing these moves every sticky session to another version: never do it silently.
        // (Cross-checked against an independent implementation of the same constants.)
        assert_eq!(stable_hash(&[]), mix(FNV_OFFSET));
        assert_eq!(stable_hash(&[b"eu-canary", b"session-1"]), 0x6bd5_766b_f7bd_1627);
        assert_ne!(stable_hash(&[b"ab", b"c"]), stable_hash(&[b"a", b"bc"]));
    }

    #[test]
    fn buckets_stay_in_range() {
        for h in [0, 1, u64::MAX / 2, u64::MAX] {
            assert!(bucket(h, 100) < 100);
        }
        assert_eq!(bucket(u64::MAX, 1), 0);
    }
}
