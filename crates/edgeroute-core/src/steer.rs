//! The client's steering arithmetic (groundwork for the SDK): how fast a node is now, which
//! candidate to pin, when a first token is late, how many retries the fleet can afford, and how
//! long an ejected node sits out. Pure: time is a `Duration` since the caller's origin and
//! randomness is a number in [0, 1) the caller draws from its own seeded generator.
//!
//! - [`PeakEwma`]: latency smoothed with an exponentially weighted moving average that jumps to
//!   any sample above it at once (a node that just got slow is treated as slow now) and decays
//!   towards faster samples with time constant `tau`; outstanding requests multiply the cost,
//!   as in Finagle's and Linkerd's balancers.
//! - [`pick`]: predicted TTFT = measured RTT + the node's reported queue wait; the best wins,
//!   except that candidates within a margin of it are near-ties broken at random, so a thousand
//!   clients starting together do not all pin the same node.
//! - [`TtftDeadline`]: mean + 4 × mean deviation of observed first-token times, clamped.
//! - [`RetryBudget`]: retries and hedges allowed as a share of recent requests plus a small
//!   floor per second, so a fleet outage never becomes a retry storm.
//! - [`Backoff`]: exponential ejection time with jitter.

use std::collections::VecDeque;
use std::time::Duration;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Peak-EWMA latency estimate of one node.
#[derive(Debug, Clone)]
pub struct PeakEwma {
    tau_ms: f64,
    cost_ms: f64,
    stamp: Option<Duration>,
    pending: u32,
}

impl PeakEwma {
    /// `tau`: how long a fast sample takes to pull the estimate down by ~63 %. `initial`: the
    /// estimate before any sample (e.g. the probe RTT).
    pub fn new(tau: Duration, initial: Duration) -> Self {
        PeakEwma { tau_ms: ms(tau).max(1.0), cost_ms: ms(initial), stamp: None, pending: 0 }
    }

    /// A request finished (or a first token arrived) after `rtt`, at `now`.
    pub fn observe(&mut self, rtt: Duration, now: Duration) {
        let sample = ms(rtt);
        if sample > self.cost_ms {
            self.cost_ms = sample;
        } else {
            let elapsed = self.stamp.map_or(0.0, |t| ms(now.saturating_sub(t)));
            let w = (-elapsed / self.tau_ms).exp();
            self.cost_ms = self.cost_ms * w + sample * (1.0 - w);
        }
        self.stamp = Some(now);
    }

    pub fn start(&mut self) {
        self.pending = self.pending.saturating_add(1);
    }

    pub fn finish(&mut self) {
        self.pending = self.pending.saturating_sub(1);
    }

    /// The smoothed latency, ms.
    pub fn latency_ms(&self) -> f64 {
        self.cost_ms
    }

    /// The balancing cost: latency × (outstanding + 1).
    pub fn cost(&self) -> f64 {
        self.cost_ms * f64::from(self.pending + 1)
    }
}

/// One probed candidate.
#[derive(Debug, Clone, PartialEq)]
pub struct Probed {
    pub id: String,
    /// Handshake plus one small request, from the client.
    pub rtt: Duration,
    /// The node's own queue estimate (from its load report), ms.
    pub queue_wait_ms: f64,
}

impl Probed {
    pub fn predicted_ttft_ms(&self) -> f64 {
        ms(self.rtt) + self.queue_wait_ms.max(0.0)
    }
}

/// Near-ties: candidates within `max(abs_ms, rel × best)` of the best are equally good.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TieMargin {
    pub abs_ms: f64,
    pub rel: f64,
}

impl Default for TieMargin {
    fn default() -> Self {
        TieMargin { abs_ms: 2.0, rel: 0.05 }
    }
}

/// The index of the candidate to pin: the best predicted TTFT, a near-tie broken by `draw`
/// (uniform in [0, 1)). `None` when `probed` is empty.
pub fn pick(probed: &[Probed], margin: TieMargin, draw: f64) -> Option<usize> {
    let best = probed.iter().map(Probed::predicted_ttft_ms).min_by(f64::total_cmp)?;
    let limit = best + margin.abs_ms.max(margin.rel * best);
    let ties: Vec<usize> =
        (0..probed.len()).filter(|&i| probed[i].predicted_ttft_ms() <= limit).collect();
    let k = ((draw.clamp(0.0, 0.999_999) * ties.len() as f64) as usize).min(ties.len() - 1);
    Some(ties[k])
}

/// Whether a probe still outstanding could beat the best answer so far: it cannot once the
/// time waited exceeds the best prediction plus the tie margin (it would arrive later still).
pub fn can_still_win(best_ms: f64, waited: Duration, margin: TieMargin) -> bool {
    ms(waited) <= best_ms + margin.abs_ms.max(margin.rel * best_ms)
}

/// The time-to-first-token deadline from observed first tokens: mean + 4 × mean absolute
/// deviation (smoothed), clamped to `[min, max]`.
#[derive(Debug, Clone)]
pub struct TtftDeadline {
    mean_ms: Option<f64>,
    dev_ms: f64,
    min: Duration,
    max: Duration,
    initial: Duration,
}

impl TtftDeadline {
    /// `initial` until the first sample.
    pub fn new(initial: Duration, min: Duration, max: Duration) -> Self {
        TtftDeadline { mean_ms: None, dev_ms: 0.0, min, max, initial }
    }

    /// A first token arrived after `ttft` (gain 1/8 for the mean, 1/4 for the deviation, as
    /// TCP's retransmission timer).
    pub fn observe(&mut self, ttft: Duration) {
        let x = ms(ttft);
        match self.mean_ms {
            None => {
                self.mean_ms = Some(x);
                self.dev_ms = x / 2.0;
            }
            Some(m) => {
                self.dev_ms += ((x - m).abs() - self.dev_ms) / 4.0;
                self.mean_ms = Some(m + (x - m) / 8.0);
            }
        }
    }

    /// The smoothed mean and mean deviation of the samples so far, ms; `None` before any.
    pub fn estimate(&self) -> Option<(f64, f64)> {
        self.mean_ms.map(|m| (m, self.dev_ms))
    }

    pub fn deadline(&self) -> Duration {
        let Some(m) = self.mean_ms else { return self.initial.clamp(self.min, self.max) };
        let d = Duration::from_secs_f64(((m + 4.0 * self.dev_ms) / 1000.0).max(0.0));
        d.clamp(self.min, self.max)
    }
}

/// Retries and hedges as a share of recent requests, plus a floor per second.
#[derive(Debug, Clone)]
pub struct RetryBudget {
    ratio: f64,
    floor_per_s: f64,
    window: Duration,
    requests: VecDeque<Duration>,
    retries: VecDeque<Duration>,
}

impl RetryBudget {
    /// Allows `ratio` retries per request over `window`, plus `floor_per_s` retries per second.
    pub fn new(ratio: f64, floor_per_s: f64, window: Duration) -> Self {
        RetryBudget {
            ratio: ratio.max(0.0),
            floor_per_s: floor_per_s.max(0.0),
            window: window.max(Duration::from_millis(1)),
            requests: VecDeque::new(),
            retries: VecDeque::new(),
        }
    }

    fn trim(&mut self, now: Duration) {
        let from = now.saturating_sub(self.window);
        while self.requests.front().is_some_and(|t| *t < from) {
            self.requests.pop_front();
        }
        while self.retries.front().is_some_and(|t| *t < from) {
            self.retries.pop_front();
        }
    }

    /// An original request was sent at `now`.
    pub fn record_request(&mut self, now: Duration) {
        self.trim(now);
        self.requests.push_back(now);
    }

    /// Takes one retry (or hedge) from the budget at `now`, if there is one left.
    pub fn try_retry(&mut self, now: Duration) -> bool {
        self.trim(now);
        let allowed =
            self.ratio * self.requests.len() as f64 + self.floor_per_s * self.window.as_secs_f64();
        if (self.retries.len() as f64) < allowed.floor() {
            self.retries.push_back(now);
            true
        } else {
            false
        }
    }
}

/// How long an ejected node sits out: `base × 2^(failures-1)`, capped, with jitter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
    /// Share of the delay that is randomised: 0.5 gives a delay in [0.5 d, d].
    pub jitter: f64,
}

impl Backoff {
    /// The delay after `failures` consecutive hard failures; `draw` uniform in [0, 1).
    pub fn delay(&self, failures: u32, draw: f64) -> Duration {
        let exp = failures.saturating_sub(1).min(30);
        let d = self.base.saturating_mul(1u32 << exp).min(self.max);
        let j = self.jitter.clamp(0.0, 1.0) * draw.clamp(0.0, 1.0);
        d.mul_f64(1.0 - j)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn d(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    #[test]
    fn peak_ewma_jumps_up_and_decays_down() {
        let mut e = PeakEwma::new(d(1000), d(20));
        e.observe(d(200), d(0));
        assert_eq!(e.latency_ms(), 200.0, "a slow sample counts at once");
        e.observe(d(20), d(1000));
        let after_tau = e.latency_ms();
        assert!((after_tau - (20.0 + 180.0 * (-1.0f64).exp())).abs() < 1e-9);
        e.observe(d(20), d(10_000));
        assert!(e.latency_ms() < 21.0, "long after, the fast samples rule");
        e.start();
        e.start();
        assert!((e.cost() - 3.0 * e.latency_ms()).abs() < 1e-9);
    }

    #[test]
    fn pick_prefers_predicted_ttft_and_spreads_near_ties() {
        let p =
            |id: &str, rtt: u64, q: f64| Probed { id: id.into(), rtt: d(rtt), queue_wait_ms: q };
        // Toronto is nearer but queued; Montreal wins on predicted TTFT.
        let cands = [p("tor", 3, 40.0), p("mtl", 9, 0.0), p("van", 60, 0.0)];
        assert_eq!(pick(&cands, TieMargin::default(), 0.3), Some(1));
        // Two within 2 ms: both get picked across draws; the far one never.
        let ties = [p("a", 10, 0.0), p("b", 11, 0.0), p("c", 40, 0.0)];
        let picked: std::collections::BTreeSet<usize> = (0..10)
            .map(|i| pick(&ties, TieMargin::default(), f64::from(i) / 10.0).unwrap())
            .collect();
        assert_eq!(picked, [0, 1].into());
        assert_eq!(pick(&[], TieMargin::default(), 0.5), None);
        assert!(can_still_win(10.0, d(11), TieMargin::default()));
        assert!(!can_still_win(10.0, d(13), TieMargin::default()));
    }

    #[test]
    fn ttft_deadline_follows_observations_within_bounds() {
        let mut t = TtftDeadline::new(d(1000), d(150), d(3000));
        assert_eq!(t.deadline(), d(1000));
        for _ in 0..50 {
            t.observe(d(100));
        }
        // Steady 100 ms: the deviation decays and the floor holds.
        assert_eq!(t.deadline(), d(150));
        t.observe(d(900));
        assert!(t.deadline() > d(400), "a slow token widens the deadline");
        t.observe(d(60_000));
        assert_eq!(t.deadline(), d(3000));
    }

    #[test]
    fn retry_budget_allows_a_share_and_a_floor_and_recovers() {
        let mut b = RetryBudget::new(0.1, 1.0, d(10_000));
        // No traffic: the floor alone (1/s over 10 s).
        let granted = (0..100).filter(|_| b.try_retry(d(0))).count();
        assert_eq!(granted, 10);
        // 1,000 requests: +100 retries.
        for i in 0..1000 {
            b.record_request(d(i));
        }
        let more = (0..1000).filter(|_| b.try_retry(d(1000))).count();
        assert_eq!(more, 100);
        // After the window, the spent retries have expired.
        assert!(b.try_retry(d(30_000)));
    }

    #[test]
    fn backoff_doubles_caps_and_jitters() {
        let b = Backoff { base: d(100), max: d(5000), jitter: 0.5 };
        assert_eq!(b.delay(1, 0.0), d(100));
        assert_eq!(b.delay(3, 0.0), d(400));
        assert_eq!(b.delay(40, 0.0), d(5000));
        assert_eq!(b.delay(3, 1.0), d(200));
    }

    proptest! {
        /// Every outage is bounded: whatever the pattern of requests and retries, the retries
        /// granted within any window never exceed ratio × requests + floor × window.
        #[test]
        fn retries_never_exceed_the_budget(events in proptest::collection::vec((0u64..20_000, any::<bool>()), 1..400)) {
            let mut evs = events.clone();
            evs.sort();
            let mut b = RetryBudget::new(0.1, 0.5, d(10_000));
            let mut reqs = Vec::new();
            let mut granted = Vec::new();
            for (t, is_retry) in evs {
                if is_retry {
                    if b.try_retry(d(t)) { granted.push(t); }
                } else {
                    b.record_request(d(t));
                    reqs.push(t);
                }
            }
            for &end in &granted {
                let from = end.saturating_sub(10_000);
                let r = reqs.iter().filter(|&&t| t >= from && t <= end).count() as f64;
                let g = granted.iter().filter(|&&t| t >= from && t <= end).count() as f64;
                prop_assert!(g <= (0.1 * r + 0.5 * 10.0).floor() + 1e-9, "{g} retries for {r} requests");
            }
        }

        #[test]
        fn pick_returns_a_candidate_within_the_margin(rtts in proptest::collection::vec(0u64..500, 1..10), draw in 0.0f64..1.0) {
            let probed: Vec<Probed> = rtts.iter().enumerate().map(|(i, r)| Probed { id: i.to_string(), rtt: d(*r), queue_wait_ms: 0.0 }).collect();
            let i = pick(&probed, TieMargin::default(), draw).unwrap();
            let best = *rtts.iter().min().unwrap() as f64;
            prop_assert!(probed[i].predicted_ttft_ms() <= best + 2.0f64.max(0.05 * best) + 1e-9);
        }
    }
}
