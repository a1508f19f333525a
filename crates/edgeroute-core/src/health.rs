//! Health estimation for discovery: is a node ready, degraded, saturated, draining or
//! unhealthy? Pure: every input carries its time, nothing reads a clock.
//!
//! Two detectors, because a node can fail two ways:
//! - **Silence** — probes stop arriving. A phi-accrual detector (Hayashibara et al.) turns the
//!   time since the last good probe into a suspicion level φ = −log10(P(a probe this late)),
//!   using the mean and deviation of past inter-arrival times, so a node with jittery probes is
//!   not ejected for one late answer, and a dead node is noticed in a bounded time.
//! - **Failing requests** — the node answers probes but its requests fail. The node's reported
//!   server-side error rate (client errors are never counted) is judged by the lower bound of a
//!   Wilson score interval, so 2 failures out of 3 requests do not eject a node while 200 out
//!   of 300 do.
//!
//! Ejecting and readmitting use different thresholds (hysteresis), and an ejected node rejoins
//! only after `readmit_after` consecutive good probes.

use std::time::Duration;

/// Detector parameters (documented defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HealthParams {
    /// φ above which a silent node is ejected. Default 8 (≈ 1 in 10⁸ that a live node is this
    /// late given its history).
    pub phi_eject: f64,
    /// Inter-arrival history kept. Default 100.
    pub window: usize,
    /// Floor on the deviation of probe intervals, so a perfectly regular history does not make
    /// φ explode on a few milliseconds of jitter. Default 100 ms.
    pub min_std: Duration,
    /// Wilson lower bound of the error rate above which the node is ejected. Default 0.5.
    pub eject_error_rate: f64,
    /// Wilson lower bound above which the node is degraded. Default 0.1.
    pub degrade_error_rate: f64,
    /// z of the Wilson interval. Default 1.96 (95 %).
    pub z: f64,
    /// Consecutive good probes before an ejected node rejoins. Default 3.
    pub readmit_after: u32,
}

impl Default for HealthParams {
    fn default() -> Self {
        HealthParams {
            phi_eject: 8.0,
            window: 100,
            min_std: Duration::from_millis(100),
            eject_error_rate: 0.5,
            degrade_error_rate: 0.1,
            z: 1.96,
            readmit_after: 3,
        }
    }
}

/// Lower bound of the Wilson score interval for `failures` out of `total`.
pub fn wilson_lower(failures: u64, total: u64, z: f64) -> f64 {
    if total == 0 {
        return 0.0;
    }
    let n = total as f64;
    let p = failures as f64 / n;
    let z2 = z * z;
    let centre = p + z2 / (2.0 * n);
    let margin = z * ((p * (1.0 - p) + z2 / (4.0 * n)) / n).sqrt();
    ((centre - margin) / (1.0 + z2 / n)).max(0.0)
}

/// The phi-accrual failure detector over probe arrivals.
#[derive(Debug, Clone)]
pub struct PhiAccrual {
    intervals: std::collections::VecDeque<f64>,
    /// Running sums of the intervals and their squares: φ in O(1).
    sum: f64,
    sum_sq: f64,
    last: Option<Duration>,
    window: usize,
    min_std_ms: f64,
}

impl PhiAccrual {
    pub fn new(window: usize, min_std: Duration) -> Self {
        PhiAccrual {
            intervals: Default::default(),
            sum: 0.0,
            sum_sq: 0.0,
            last: None,
            window: window.max(2),
            min_std_ms: min_std.as_secs_f64() * 1000.0,
        }
    }

    /// A good probe answered at `now`.
    pub fn heartbeat(&mut self, now: Duration) {
        if let Some(last) = self.last
            && now > last
        {
            if self.intervals.len() == self.window
                && let Some(old) = self.intervals.pop_front()
            {
                self.sum -= old;
                self.sum_sq -= old * old;
            }
            let x = (now - last).as_secs_f64() * 1000.0;
            self.intervals.push_back(x);
            self.sum += x;
            self.sum_sq += x * x;
        }
        self.last = Some(now);
    }

    /// Suspicion at `now`: 0 with no history (nothing to judge yet).
    pub fn phi(&self, now: Duration) -> f64 {
        let (Some(last), false) = (self.last, self.intervals.is_empty()) else { return 0.0 };
        let n = self.intervals.len() as f64;
        let mean = self.sum / n;
        let var = (self.sum_sq / n - mean * mean).max(0.0);
        let std = var.sqrt().max(self.min_std_ms);
        let t = now.saturating_sub(last).as_secs_f64() * 1000.0;
        // P(interval > t) under a normal model, by the logistic approximation of its CDF.
        let y = (t - mean) / std;
        let e = (-y * (1.5976 + 0.070566 * y * y)).exp();
        let p_later = if t > mean { e / (1.0 + e) } else { 1.0 - 1.0 / (1.0 + e) };
        -(p_later.max(f64::MIN_POSITIVE)).log10()
    }
}

/// Discovery's verdict on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ready,
    Degraded,
    Saturated,
    Draining,
    Unhealthy,
}

/// What a node reported in its last `/health` (already parsed).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Report {
    /// Requests in the node's window and how many failed on its side.
    pub requests: u64,
    pub failures: u64,
    pub draining: bool,
    pub saturated: bool,
}

/// One node's health over time.
#[derive(Debug, Clone)]
pub struct HealthTracker {
    params: HealthParams,
    phi: PhiAccrual,
    ejected: bool,
    good_streak: u32,
    last: Option<Report>,
}

impl HealthTracker {
    pub fn new(params: HealthParams) -> Self {
        HealthTracker {
            phi: PhiAccrual::new(params.window, params.min_std),
            params,
            ejected: false,
            good_streak: 0,
            last: None,
        }
    }

    /// A probe answered at `now` with `report`.
    pub fn probe_ok(&mut self, now: Duration, report: Report) {
        self.phi.heartbeat(now);
        self.last = Some(report);
        let failing = wilson_lower(report.failures, report.requests, self.params.z)
            > self.params.eject_error_rate;
        if failing {
            self.good_streak = 0;
            self.ejected = true;
        } else {
            self.good_streak = self.good_streak.saturating_add(1);
            if self.ejected && self.good_streak >= self.params.readmit_after {
                self.ejected = false;
            }
        }
    }

    /// A probe failed (refused, timed out, 5xx) at `now`. Only silence accrues suspicion; a
    /// failed probe also breaks a recovery streak.
    pub fn probe_failed(&mut self, _now: Duration) {
        self.good_streak = 0;
    }

    pub fn phi(&self, now: Duration) -> f64 {
        self.phi.phi(now)
    }

    pub fn params(&self) -> &HealthParams {
        &self.params
    }

    pub fn verdict(&mut self, now: Duration) -> Verdict {
        if self.phi.phi(now) > self.params.phi_eject {
            self.ejected = true;
            self.good_streak = 0;
        }
        if self.ejected {
            return Verdict::Unhealthy;
        }
        let Some(r) = self.last else { return Verdict::Unhealthy };
        if r.draining {
            Verdict::Draining
        } else if wilson_lower(r.failures, r.requests, self.params.z)
            > self.params.degrade_error_rate
        {
            Verdict::Degraded
        } else if r.saturated {
            Verdict::Saturated
        } else {
            Verdict::Ready
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;
    const OK: Report = Report { requests: 100, failures: 0, draining: false, saturated: false };

    #[test]
    fn wilson_needs_evidence() {
        let eject = HealthParams::default().eject_error_rate;
        assert!(wilson_lower(2, 3, 1.96) < eject, "2 of 3 is not enough to eject");
        assert!(wilson_lower(200, 300, 1.96) > 0.6);
        assert_eq!(wilson_lower(0, 0, 1.96), 0.0);
        assert_eq!(wilson_lower(0, 1000, 1.96), 0.0);
    }

    #[test]
    fn a_silent_node_is_ejected_in_bounded_time_and_jitter_is_tolerated() {
        let mut h = HealthTracker::new(HealthParams::default());
        // Probes every second with ±50 ms jitter.
        let mut t = 0u64;
        for i in 0..30 {
            t += 1000 + if i % 2 == 0 { 50 } else { 0 };
            h.probe_ok(MS(t), OK);
        }
        assert_eq!(h.verdict(MS(t + 1200)), Verdict::Ready, "one late probe is not death");
        // Silence: find when it is ejected.
        let dead_at = (1..60)
            .map(|s| t + s * 100)
            .find(|&now| h.verdict(MS(now)) == Verdict::Unhealthy)
            .unwrap();
        let after = dead_at - t;
        assert!((1300..=3000).contains(&after), "ejected {after} ms after the last probe");
    }

    #[test]
    fn readmission_needs_consecutive_good_probes() {
        let p = HealthParams::default();
        let mut h = HealthTracker::new(p);
        h.probe_ok(MS(1000), Report { requests: 300, failures: 200, ..OK });
        assert_eq!(h.verdict(MS(1000)), Verdict::Unhealthy);
        h.probe_ok(MS(2000), OK);
        h.probe_ok(MS(3000), OK);
        h.probe_failed(MS(3500));
        h.probe_ok(MS(4000), OK);
        assert_eq!(h.verdict(MS(4000)), Verdict::Unhealthy, "the streak was broken");
        h.probe_ok(MS(5000), OK);
        h.probe_ok(MS(6000), OK);
        assert_eq!(h.verdict(MS(6000)), Verdict::Ready);
    }

    #[test]
    fn degraded_saturated_and_draining_are_distinct() {
        let mut h = HealthTracker::new(HealthParams::default());
        h.probe_ok(MS(1000), Report { requests: 400, failures: 80, ..OK });
        assert_eq!(h.verdict(MS(1000)), Verdict::Degraded);
        h.probe_ok(MS(2000), Report { saturated: true, ..OK });
        assert_eq!(h.verdict(MS(2000)), Verdict::Saturated, "full but healthy is not ejected");
        h.probe_ok(MS(3000), Report { draining: true, ..OK });
        assert_eq!(h.verdict(MS(3000)), Verdict::Draining);
        // Few requests, some failed: not enough evidence to degrade.
        h.probe_ok(MS(4000), Report { requests: 4, failures: 1, ..OK });
        assert_eq!(h.verdict(MS(4000)), Verdict::Ready);
    }
}
