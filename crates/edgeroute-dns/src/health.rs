//! One target's health from its probes: down fast, up slowly.
//!
//! A target (a discovery replica, a regional router) is withdrawn from answers after
//! `down_after` failed probes in a row, and returns only after `up_probes` good probes in a
//! row spanning at least `up_after_ms` — a target that flaps stays out. A target not yet
//! probed counts as up (a server that just started answers with everything it knows). The
//! clock is the caller's (`now_ms`, monotonic milliseconds).

/// The thresholds; every one explicit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthRules {
    /// Failed probes in a row that withdraw a target. At least 1.
    pub down_after: u32,
    /// Good probes in a row a withdrawn target needs before it returns. At least 1.
    pub up_probes: u32,
    /// And for at least this long, ms, from the first of them.
    pub up_after_ms: u64,
    /// After a change (either way) answers naming the target's kind carry the short TTL for
    /// this long, ms.
    pub changing_window_ms: u64,
}

impl Default for HealthRules {
    fn default() -> Self {
        HealthRules { down_after: 2, up_probes: 3, up_after_ms: 10_000, changing_window_ms: 60_000 }
    }
}

/// One target's health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    up: bool,
    /// Failed probes in a row while up.
    fails: u32,
    /// Good probes in a row while down, and when the first of them came.
    goods: u32,
    good_since_ms: Option<u64>,
    /// When the target last changed state.
    changed_at_ms: Option<u64>,
}

impl Default for Health {
    fn default() -> Self {
        Health::new()
    }
}

impl Health {
    /// A target not yet probed: up.
    pub fn new() -> Health {
        Health { up: true, fails: 0, goods: 0, good_since_ms: None, changed_at_ms: None }
    }

    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Takes a probe's result in. True when the target changed state.
    pub fn on_probe(&mut self, ok: bool, now_ms: u64, rules: &HealthRules) -> bool {
        if self.up {
            if ok {
                self.fails = 0;
                return false;
            }
            self.fails += 1;
            if self.fails < rules.down_after.max(1) {
                return false;
            }
            *self = Health {
                up: false,
                fails: 0,
                goods: 0,
                good_since_ms: None,
                changed_at_ms: Some(now_ms),
            };
            return true;
        }
        if !ok {
            self.goods = 0;
            self.good_since_ms = None;
            return false;
        }
        self.goods += 1;
        let since = *self.good_since_ms.get_or_insert(now_ms);
        if self.goods < rules.up_probes.max(1) || now_ms.saturating_sub(since) < rules.up_after_ms {
            return false;
        }
        *self = Health {
            up: true,
            fails: 0,
            goods: 0,
            good_since_ms: None,
            changed_at_ms: Some(now_ms),
        };
        true
    }

    /// Whether the target's state is in motion: it changed within the window, or it is down
    /// and answering again (on its way back).
    pub fn changing(&self, now_ms: u64, rules: &HealthRules) -> bool {
        let recent =
            self.changed_at_ms.is_some_and(|t| now_ms.saturating_sub(t) < rules.changing_window_ms);
        recent || (!self.up && self.goods > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const R: HealthRules = HealthRules {
        down_after: 2,
        up_probes: 3,
        up_after_ms: 10_000,
        changing_window_ms: 60_000,
    };

    #[test]
    fn two_failed_probes_withdraw_a_target_and_one_does_not() {
        let mut h = Health::new();
        assert!(h.is_up() && !h.changing(0, &R));
        assert!(!h.on_probe(false, 250, &R));
        assert!(h.is_up(), "one failure is not enough");
        assert!(!h.on_probe(true, 500, &R));
        assert!(!h.on_probe(false, 750, &R));
        assert!(h.on_probe(false, 1000, &R), "two in a row");
        assert!(!h.is_up() && h.changing(1000, &R));
    }

    #[test]
    fn a_target_returns_only_after_three_good_probes_and_ten_seconds() {
        let mut h = Health::new();
        h.on_probe(false, 0, &R);
        h.on_probe(false, 250, &R);
        assert!(!h.is_up());
        // Three good probes quickly: still out (the hold is not over).
        for t in [500, 750, 1000] {
            assert!(!h.on_probe(true, t, &R));
        }
        assert!(!h.is_up() && h.changing(1000, &R), "on its way back: short TTL");
        // A failure restarts the count and the hold.
        h.on_probe(false, 5000, &R);
        for t in (5250..15_250).step_by(250) {
            assert!(!h.on_probe(true, t, &R), "back too early at {t}");
        }
        assert!(h.on_probe(true, 15_250, &R), "10 s of good probes since 5250");
        assert!(h.is_up());
        assert!(h.changing(15_250 + 59_999, &R) && !h.changing(15_250 + 60_000, &R));
    }

    proptest! {
        /// Whatever the probes, a target is never up right after `down_after` failures in a
        /// row, and never returns sooner than `up_after_ms` after its last failure.
        #[test]
        fn down_fast_up_slowly(probes in proptest::collection::vec(any::<bool>(), 1..200)) {
            let mut h = Health::new();
            let (mut run_of_fails, mut last_fail) = (0u32, None::<u64>);
            for (i, ok) in probes.into_iter().enumerate() {
                let now = i as u64 * 250;
                let was_up = h.is_up();
                let changed = h.on_probe(ok, now, &R);
                run_of_fails = if ok { 0 } else { run_of_fails + 1 };
                if !ok {
                    last_fail = Some(now);
                }
                if run_of_fails >= R.down_after {
                    prop_assert!(!h.is_up());
                }
                if changed && h.is_up() {
                    prop_assert!(!was_up);
                    let since = last_fail.map_or(u64::MAX, |f| now - f);
                    prop_assert!(since > R.up_after_ms, "back {since} ms after a failure");
                }
            }
        }
    }
}
