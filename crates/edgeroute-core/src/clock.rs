//! The one wall-clock seam. Every component that needs the time of day (event stamps, token
//! expiry, `created` fields, persisted list ages) takes a [`WallClock`]; production wiring
//! passes [`system`], tests a fixed or stepping clock. [`system`] and [`unix_ms`] are the only
//! places in edgeroute's production code that read `SystemTime` (clippy's `disallowed-methods`
//! enforces it). Decision functions in this crate never call them: they take `now` as an
//! argument. Monotonic time is tokio's (`tokio::time::Instant`), which paused-clock tests drive.

use std::sync::Arc;

/// Unix time in milliseconds, from wherever the caller's clock comes from.
pub type WallClock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The system's wall clock, Unix milliseconds (0 before 1970, saturating far in the future).
#[allow(clippy::disallowed_methods)] // The seam itself.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The system's wall clock as a [`WallClock`].
pub fn system() -> WallClock {
    Arc::new(unix_ms)
}

/// `clock`'s time in whole seconds (token expiry, OpenAI's `created`).
pub fn unix_s(clock: &WallClock) -> u64 {
    clock() / 1000
}

/// A clock stopped at `ms` (tests).
pub fn fixed(ms: u64) -> WallClock {
    Arc::new(move || ms)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_system_clock_is_after_2020_and_a_fixed_one_never_moves() {
        assert!(super::system()() > 1_577_836_800_000);
        let c = super::fixed(42);
        assert_eq!((c(), c()), (42, 42));
    }
}
