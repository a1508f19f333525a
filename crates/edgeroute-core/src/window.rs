//! Sliding-window telemetry: latency percentiles and error rates over the last few seconds.
//!
//! A window is a ring of fixed-length slots (default 10 × 1 s). Recording touches one slot;
//! a slot whose epoch has passed is cleared before reuse, so an idle node reports an empty
//! window rather than old figures. Latencies go into a log-linear histogram (16 sub-buckets
//! per power of two, so a reported percentile is within ~6 % of the true value) — bounded
//! memory however many samples arrive, unlike keeping every sample.

use std::time::Duration;

/// Shape of a sliding window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowConfig {
    /// Length of one slot.
    pub slot: Duration,
    /// Number of slots; the window covers `slot * slots`.
    pub slots: usize,
}

impl Default for WindowConfig {
    fn default() -> Self {
        WindowConfig { slot: Duration::from_secs(1), slots: 10 }
    }
}

impl WindowConfig {
    pub fn span(&self) -> Duration {
        self.slot * self.slots as u32
    }

    fn epoch(&self, now: Duration) -> u64 {
        let slot_ns = self.slot.as_nanos().max(1);
        (now.as_nanos() / slot_ns) as u64
    }

    /// Whether a slot stamped `slot_epoch` is inside the window ending at epoch `current`.
    fn live(&self, slot_epoch: u64, current: u64) -> bool {
        slot_epoch <= current && current - slot_epoch < self.slots as u64
    }
}

const SUB: u64 = 16;
const LINEAR: u64 = 2 * SUB;
/// Values up to 2^41 µs (~25 days) are bucketed; larger ones land in the last bucket.
const MAX_BIT: u64 = 41;
const BUCKETS: usize = (LINEAR + (MAX_BIT - 5) * SUB) as usize;

fn bucket_of(v: u64) -> usize {
    if v < LINEAR {
        return v as usize;
    }
    let bit = 63 - u64::from(v.leading_zeros());
    if bit >= MAX_BIT {
        return BUCKETS - 1;
    }
    let shift = bit - 4;
    (LINEAR + (bit - 5) * SUB + ((v >> shift) - SUB)) as usize
}

/// The midpoint of a bucket's range, the value reported for samples in it.
fn bucket_value(idx: usize) -> u64 {
    let idx = idx as u64;
    if idx < LINEAR {
        return idx;
    }
    let bit = (idx - LINEAR) / SUB + 5;
    let m = (idx - LINEAR) % SUB + SUB;
    let shift = bit - 4;
    let lo = m << shift;
    let hi = ((m + 1) << shift) - 1;
    lo + (hi - lo) / 2
}

#[derive(Clone)]
struct HistSlot {
    epoch: u64,
    count: u64,
    buckets: Box<[u32]>,
}

/// Latency percentiles over a sliding window, in microseconds.
#[derive(Clone)]
pub struct LatencyWindow {
    cfg: WindowConfig,
    slots: Vec<HistSlot>,
}

impl std::fmt::Debug for LatencyWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LatencyWindow").field("cfg", &self.cfg).finish_non_exhaustive()
    }
}

/// Percentiles read from a window.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Summary {
    pub p50_us: u64,
    pub p99_us: u64,
    pub count: u64,
}

impl LatencyWindow {
    pub fn new(cfg: WindowConfig) -> Self {
        let slot = HistSlot { epoch: u64::MAX, count: 0, buckets: vec![0; BUCKETS].into() };
        LatencyWindow { cfg, slots: vec![slot; cfg.slots.max(1)] }
    }

    pub fn record(&mut self, now: Duration, value: Duration) {
        let epoch = self.cfg.epoch(now);
        let n = self.slots.len();
        let slot = &mut self.slots[(epoch % n as u64) as usize];
        if slot.epoch != epoch {
            slot.epoch = epoch;
            slot.count = 0;
            slot.buckets.fill(0);
        }
        let b = bucket_of(value.as_micros().min(u128::from(u64::MAX)) as u64);
        slot.buckets[b] = slot.buckets[b].saturating_add(1);
        slot.count += 1;
    }

    /// The value at quantile `q` in [0, 1] over the live window, or `None` when empty.
    pub fn quantile(&self, now: Duration, q: f64) -> Option<u64> {
        self.quantiles(now, &[q]).map(|v| v[0])
    }

    pub fn summary(&self, now: Duration) -> Summary {
        match self.quantiles(now, &[0.5, 0.99]) {
            Some(v) => Summary { p50_us: v[0], p99_us: v[1], count: self.count(now) },
            None => Summary::default(),
        }
    }

    pub fn count(&self, now: Duration) -> u64 {
        let cur = self.cfg.epoch(now);
        self.slots.iter().filter(|s| self.cfg.live(s.epoch, cur)).map(|s| s.count).sum()
    }

    fn quantiles(&self, now: Duration, qs: &[f64]) -> Option<Vec<u64>> {
        let cur = self.cfg.epoch(now);
        let live: Vec<&HistSlot> =
            self.slots.iter().filter(|s| self.cfg.live(s.epoch, cur) && s.count > 0).collect();
        let total: u64 = live.iter().map(|s| s.count).sum();
        if total == 0 {
            return None;
        }
        // Rank of each quantile (1-based, nearest-rank method), found in one pass.
        let ranks: Vec<u64> =
            qs.iter().map(|q| ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1)).collect();
        let mut out = vec![0; qs.len()];
        let mut seen = 0u64;
        let mut next = 0usize;
        let mut order: Vec<usize> = (0..qs.len()).collect();
        order.sort_by_key(|&i| ranks[i]);
        for b in 0..BUCKETS {
            seen += live.iter().map(|s| u64::from(s.buckets[b])).sum::<u64>();
            while next < order.len() && seen >= ranks[order[next]] {
                out[order[next]] = bucket_value(b);
                next += 1;
            }
            if next == order.len() {
                break;
            }
        }
        Some(out)
    }
}

/// Success/failure counts over a sliding window: the node's error rate.
#[derive(Debug, Clone)]
pub struct OutcomeWindow {
    cfg: WindowConfig,
    slots: Vec<(u64, u64, u64)>, // (epoch, total, failures)
}

impl OutcomeWindow {
    pub fn new(cfg: WindowConfig) -> Self {
        OutcomeWindow { cfg, slots: vec![(u64::MAX, 0, 0); cfg.slots.max(1)] }
    }

    pub fn record(&mut self, now: Duration, failed: bool) {
        let epoch = self.cfg.epoch(now);
        let n = self.slots.len();
        let slot = &mut self.slots[(epoch % n as u64) as usize];
        if slot.0 != epoch {
            *slot = (epoch, 0, 0);
        }
        slot.1 += 1;
        slot.2 += u64::from(failed);
    }

    /// (total, failures) over the live window.
    pub fn totals(&self, now: Duration) -> (u64, u64) {
        let cur = self.cfg.epoch(now);
        self.slots
            .iter()
            .filter(|s| self.cfg.live(s.0, cur))
            .fold((0, 0), |(t, f), s| (t + s.1, f + s.2))
    }

    /// Failures / total over the live window; 0 when there were no requests.
    pub fn rate(&self, now: Duration) -> f64 {
        let (t, f) = self.totals(now);
        if t == 0 { 0.0 } else { f as f64 / t as f64 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const S: fn(u64) -> Duration = Duration::from_secs;
    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn buckets_are_monotonic_and_tight() {
        let mut last = 0;
        for v in [0u64, 1, 31, 32, 33, 63, 64, 100, 1_000, 12_345, 1 << 30, 1 << 40] {
            let b = bucket_of(v);
            assert!(b >= last, "bucket order broke at {v}");
            last = b;
            let rep = bucket_value(b) as f64;
            assert!((rep - v as f64).abs() <= (v as f64 * 0.07).max(1.0), "{v} -> {rep}");
        }
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn percentiles_of_a_known_distribution() {
        let mut w = LatencyWindow::new(WindowConfig::default());
        for i in 1..=100u64 {
            w.record(S(5), MS(i));
        }
        let s = w.summary(S(5));
        assert_eq!(s.count, 100);
        assert!((47_000..=53_000).contains(&s.p50_us), "p50 {}", s.p50_us);
        assert!((93_000..=103_000).contains(&s.p99_us), "p99 {}", s.p99_us);
    }

    #[test]
    fn old_samples_leave_the_window() {
        let cfg = WindowConfig { slot: S(1), slots: 3 };
        let mut w = LatencyWindow::new(cfg);
        w.record(S(10), MS(500));
        w.record(S(12), MS(10));
        assert_eq!(w.count(S(12)), 2);
        // At t=13 the slot of t=10 is out of the 3 s window.
        assert_eq!(w.count(S(13)), 1);
        assert!(w.quantile(S(13), 0.99).unwrap() < 11_000);
        assert_eq!(w.summary(S(100)), Summary::default());
        // A reused slot is cleared before recording.
        w.record(S(13), MS(1));
        assert_eq!(w.count(S(13)), 2);
    }

    #[test]
    fn error_rate_counts_and_expires() {
        let mut o = OutcomeWindow::new(WindowConfig { slot: S(1), slots: 2 });
        assert_eq!(o.rate(S(0)), 0.0);
        o.record(S(1), true);
        o.record(S(1), false);
        o.record(S(2), false);
        o.record(S(2), false);
        assert_eq!(o.totals(S(2)), (4, 1));
        assert_eq!(o.rate(S(2)), 0.25);
        assert_eq!(o.totals(S(3)), (2, 0));
    }

    proptest! {
        #[test]
        fn quantile_is_within_bucket_precision(mut xs in proptest::collection::vec(1u64..10_000_000, 1..300), q in 0.0f64..=1.0) {
            let mut w = LatencyWindow::new(WindowConfig::default());
            for &x in &xs { w.record(S(1), Duration::from_micros(x)); }
            xs.sort_unstable();
            let rank = ((q * xs.len() as f64).ceil() as usize).max(1);
            let truth = xs[rank - 1] as f64;
            let got = w.quantile(S(1), q).unwrap() as f64;
            prop_assert!((got - truth).abs() <= truth * 0.07 + 1.0, "q={} truth={} got={}", q, truth, got);
        }
    }
}
