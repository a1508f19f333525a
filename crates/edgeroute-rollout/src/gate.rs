//! Whether a step passes: the new version against the old one in the same region over the
//! same window, judged by the plan's [`Gates`]. Pure arithmetic.
//!
//! Failures are judged as soon as the evidence is there — a correctness-probe failure at once,
//! an error rate significantly above the old version's once the new one has `min_requests` —
//! while a pass needs the whole soak and the TTFT comparison at its end.

use serde::{Deserialize, Serialize};

use crate::plan::Gates;

/// One version's figures in one region since the step began.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct VersionStats {
    pub requests: u64,
    /// Requests that failed on the node's side (5xx, cut streams): client errors excluded.
    pub errors: u64,
    /// Time to first token, p99, ms; `None` before any.
    pub ttft_p99_ms: Option<f64>,
    /// Correctness-probe answers that did not match.
    pub correctness_failures: u64,
}

/// A gate's verdict on one region's step.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Pass,
    /// Not yet judged: why.
    Wait(String),
    /// The step failed: why (for the log and the operator).
    Fail(String),
}

/// The one-sided two-proportion z statistic of `new`'s error rate above `old`'s (pooled
/// standard error); 0 when there is nothing to compare.
pub fn error_z(old: &VersionStats, new: &VersionStats) -> f64 {
    if old.requests == 0 || new.requests == 0 {
        return 0.0;
    }
    let (n1, n2) = (old.requests as f64, new.requests as f64);
    let (e1, e2) = (old.errors.min(old.requests) as f64, new.errors.min(new.requests) as f64);
    let (p1, p2) = (e1 / n1, e2 / n2);
    let p = (e1 + e2) / (n1 + n2);
    let se = (p * (1.0 - p) * (1.0 / n1 + 1.0 / n2)).sqrt();
    if se == 0.0 {
        // Neither version erred, or both always did: no evidence of a difference.
        return 0.0;
    }
    (p2 - p1) / se
}

/// The verdict on a step in one region after `soaked_s` seconds of it.
pub fn judge(g: &Gates, old: &VersionStats, new: &VersionStats, soaked_s: u64) -> Verdict {
    if new.correctness_failures > g.max_correctness_failures {
        return Verdict::Fail(format!(
            "{} correctness-probe failure(s) on the new version (at most {})",
            new.correctness_failures, g.max_correctness_failures
        ));
    }
    if new.requests >= g.min_requests {
        let z = error_z(old, new);
        if z > g.error_z {
            return Verdict::Fail(format!(
                "error rate {:.2} % against the old version's {:.2} % (z = {z:.1} > {})",
                pct(new),
                pct(old),
                g.error_z
            ));
        }
    }
    if soaked_s < g.soak_s {
        return Verdict::Wait(format!("soaking ({soaked_s} of {} s)", g.soak_s));
    }
    if new.requests < g.min_requests {
        return Verdict::Wait(format!(
            "{} of {} requests on the new version",
            new.requests, g.min_requests
        ));
    }
    if let (Some(o), Some(n)) = (old.ttft_p99_ms, new.ttft_p99_ms)
        && n > o * g.ttft_p99_ratio
    {
        return Verdict::Fail(format!(
            "TTFT p99 {n:.1} ms against the old version's {o:.1} ms (more than {:.0} % above)",
            (g.ttft_p99_ratio - 1.0) * 100.0
        ));
    }
    Verdict::Pass
}

fn pct(s: &VersionStats) -> f64 {
    if s.requests == 0 { 0.0 } else { 100.0 * s.errors as f64 / s.requests as f64 }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

    use super::*;

    fn stats(requests: u64, errors: u64, p99: f64) -> VersionStats {
        VersionStats { requests, errors, ttft_p99_ms: Some(p99), correctness_failures: 0 }
    }

    #[test]
    fn a_clean_soaked_step_passes() {
        let g = Gates::default();
        let v = judge(&g, &stats(5000, 5, 100.0), &stats(300, 0, 105.0), 120);
        assert_eq!(v, Verdict::Pass);
    }

    #[test]
    fn it_waits_for_the_soak_and_for_enough_requests() {
        let g = Gates::default();
        assert!(
            matches!(judge(&g, &stats(5000, 5, 100.0), &stats(300, 0, 100.0), 60), Verdict::Wait(w) if w.contains("soaking"))
        );
        assert!(
            matches!(judge(&g, &stats(5000, 5, 100.0), &stats(50, 0, 100.0), 500), Verdict::Wait(w) if w.contains("50 of 200"))
        );
    }

    #[test]
    fn a_correctness_failure_fails_at_once() {
        let g = Gates::default();
        let new = VersionStats { correctness_failures: 1, ..stats(3, 0, 100.0) };
        assert!(
            matches!(judge(&g, &stats(10, 0, 100.0), &new, 0), Verdict::Fail(w) if w.contains("correctness"))
        );
    }

    #[test]
    fn a_significantly_higher_error_rate_fails_before_the_soak_ends_and_noise_does_not() {
        let g = Gates::default();
        // 0.1 % → 5 %: fails as soon as there are 200 requests.
        let v = judge(&g, &stats(5000, 5, 100.0), &stats(200, 10, 100.0), 10);
        assert!(matches!(&v, Verdict::Fail(w) if w.contains("error rate")), "{v:?}");
        // 1 % → 1.5 % on 200 requests: within noise, not a failure.
        let v = judge(&g, &stats(5000, 50, 100.0), &stats(200, 3, 100.0), 10);
        assert!(matches!(&v, Verdict::Wait(_)), "{v:?}");
        assert_eq!(error_z(&stats(0, 0, 1.0), &stats(10, 10, 1.0)), 0.0);
        assert_eq!(error_z(&stats(10, 0, 1.0), &stats(10, 0, 1.0)), 0.0);
    }

    #[test]
    fn a_slower_ttft_fails_at_the_end_of_the_soak() {
        let g = Gates::default();
        let v = judge(&g, &stats(5000, 0, 100.0), &stats(300, 0, 111.0), 120);
        assert!(matches!(&v, Verdict::Fail(w) if w.contains("TTFT")), "{v:?}");
        assert_eq!(judge(&g, &stats(5000, 0, 100.0), &stats(300, 0, 109.0), 120), Verdict::Pass);
    }
}
