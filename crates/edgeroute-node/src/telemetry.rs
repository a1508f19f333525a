//! The node's sliding-window view of its own request path: TTFT and total latency
//! percentiles, server-side error rate, in-flight count.
//!
//! Health must reflect the request path (a health check that passes while requests fail is a
//! classic failure), so these figures come from real requests, not from a synthetic probe.
//! Client errors (4xx) and client cancellations are not recorded as failures.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use edgeroute_core::window::Summary;
use edgeroute_core::{LatencyWindow, OutcomeWindow, WindowConfig};
use tokio::time::Instant;

/// How a request ended, as far as the node's health is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Served to the end.
    Ok,
    /// Failed on the node's side: backend error, timeout, cut or stalled stream.
    Failed,
}

struct Windows {
    ttft: LatencyWindow,
    latency: LatencyWindow,
    outcomes: OutcomeWindow,
}

pub struct Telemetry {
    origin: Instant,
    window: WindowConfig,
    windows: Mutex<Windows>,
    in_flight: AtomicU32,
    /// TTFT p50 in ms for the load-report header, refreshed at most every 250 ms so the
    /// header costs an atomic load, not a percentile computation.
    ttft_p50_ms: AtomicU32,
    ttft_p50_at_ms: AtomicU64,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry").field("in_flight", &self.in_flight()).finish_non_exhaustive()
    }
}

/// A snapshot for `/health`.
#[derive(Debug, Clone, Copy)]
pub struct Figures {
    pub ttft: Summary,
    pub latency: Summary,
    pub error_rate: f64,
    pub requests: u64,
}

const REFRESH_MS: u64 = 250;

impl Telemetry {
    pub fn new(window_s: u32) -> Self {
        let window = WindowConfig { slot: Duration::from_secs(1), slots: window_s.max(1) as usize };
        Telemetry {
            origin: Instant::now(),
            window,
            windows: Mutex::new(Windows {
                ttft: LatencyWindow::new(window),
                latency: LatencyWindow::new(window),
                outcomes: OutcomeWindow::new(window),
            }),
            in_flight: AtomicU32::new(0),
            ttft_p50_ms: AtomicU32::new(0),
            ttft_p50_at_ms: AtomicU64::new(0),
        }
    }

    /// Time since the node started: the clock every window uses.
    pub fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    pub fn window(&self) -> Duration {
        self.window.span()
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Admits one request if fewer than `capacity` are in flight. The returned guard releases
    /// the slot when dropped, wherever the request ends (finished, failed, client gone).
    pub fn try_admit(self: &std::sync::Arc<Self>, capacity: u32) -> Option<InFlight> {
        let prev = self.in_flight.fetch_add(1, Ordering::AcqRel);
        if prev >= capacity {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(InFlight(self.clone()))
    }

    pub fn record(&self, ttft: Option<Duration>, total: Duration, outcome: Outcome) {
        let now = self.now();
        let Ok(mut w) = self.windows.lock() else { return };
        if let Some(t) = ttft {
            w.ttft.record(now, t);
        }
        if outcome == Outcome::Ok {
            w.latency.record(now, total);
        }
        w.outcomes.record(now, outcome == Outcome::Failed);
    }

    pub fn figures(&self) -> Figures {
        let now = self.now();
        match self.windows.lock() {
            Ok(w) => {
                let (requests, _) = w.outcomes.totals(now);
                Figures {
                    ttft: w.ttft.summary(now),
                    latency: w.latency.summary(now),
                    error_rate: w.outcomes.rate(now),
                    requests,
                }
            }
            Err(_) => Figures {
                ttft: Summary::default(),
                latency: Summary::default(),
                error_rate: 0.0,
                requests: 0,
            },
        }
    }

    /// Recent TTFT p50 in milliseconds, cheap enough for every response header.
    pub fn recent_ttft_ms(&self) -> u32 {
        let now_ms = self.now().as_millis() as u64;
        let at = self.ttft_p50_at_ms.load(Ordering::Relaxed);
        if now_ms.saturating_sub(at) >= REFRESH_MS || at == 0 {
            self.ttft_p50_at_ms.store(now_ms.max(1), Ordering::Relaxed);
            if let Ok(w) = self.windows.lock() {
                let p50 = w.ttft.quantile(self.now(), 0.5).unwrap_or(0);
                self.ttft_p50_ms.store((p50 / 1000) as u32, Ordering::Relaxed);
            }
        }
        self.ttft_p50_ms.load(Ordering::Relaxed)
    }
}

/// One admitted request; dropping it frees the node's concurrency slot.
#[derive(Debug)]
pub struct InFlight(std::sync::Arc<Telemetry>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn admission_is_bounded_and_guards_release() {
        let t = Arc::new(Telemetry::new(10));
        let a = t.try_admit(2).unwrap();
        let _b = t.try_admit(2).unwrap();
        assert!(t.try_admit(2).is_none());
        assert_eq!(t.in_flight(), 2);
        drop(a);
        assert_eq!(t.in_flight(), 1);
        assert!(t.try_admit(2).is_some());
    }

    #[tokio::test]
    async fn failures_count_but_do_not_pollute_latency() {
        let t = Telemetry::new(10);
        t.record(Some(Duration::from_millis(10)), Duration::from_millis(100), Outcome::Ok);
        t.record(None, Duration::from_secs(30), Outcome::Failed);
        let f = t.figures();
        assert_eq!(f.requests, 2);
        assert_eq!(f.error_rate, 0.5);
        assert_eq!(f.latency.count, 1);
        assert!(f.latency.p99_us < 200_000);
        assert!((9..=11).contains(&t.recent_ttft_ms()));
    }
}
