//! Per-tenant rate limiting with GCRA (`governor`): local to the node, never a central call.
//! Answers carry OpenAI's `x-ratelimit-*` headers; a refusal is a 429 with `Retry-After`.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use edgeroute_http::ApiError;
use governor::clock::Clock;
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use http::{HeaderName, HeaderValue, StatusCode};

use super::{AppState, Tenant};

type Keyed =
    RateLimiter<Arc<str>, DefaultKeyedStateStore<Arc<str>>, TokioClock, StateInformationMiddleware>;

/// governor's clock on tokio's time, so the limiter follows a paused clock in tests (and the
/// node's one monotonic time source in production).
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioClock;

impl Clock for TokioClock {
    type Instant = std::time::Instant;

    fn now(&self) -> std::time::Instant {
        tokio::time::Instant::now().into_std()
    }
}

pub struct TenantLimiter {
    limiter: Keyed,
    burst: u32,
    /// Time for one request's worth of quota to replenish.
    period: Duration,
    /// The `x-ratelimit-*` values an admitted request can carry, by remaining capacity:
    /// made once, so an answer's headers cost reference-count increments, not formatting.
    headers: RateHeaders,
}

/// Most distinct remaining-capacity values given prebuilt headers; beyond, they are formatted.
const MAX_PREBUILT: u32 = 4096;

struct RateHeaders {
    limit: HeaderValue,
    /// `(remaining, reset)` for remaining = 0..=burst.
    by_remaining: Vec<(HeaderValue, HeaderValue)>,
    /// Beyond the prebuilt values (a burst above [`MAX_PREBUILT`]), the last one formatted:
    /// under steady load the remaining capacity sits at one value, so it is not formatted
    /// (and allocated) again for every response.
    last: std::sync::Mutex<Option<(u32, HeaderValue, HeaderValue)>>,
}

impl RateHeaders {
    fn new(burst: u32, period: Duration) -> Self {
        let by_remaining = (0..=burst.min(MAX_PREBUILT))
            .map(|remaining| Self::format(burst, period, remaining))
            .collect();
        RateHeaders { limit: HeaderValue::from(burst), by_remaining, last: Default::default() }
    }

    /// The `remaining` and `reset` values for `remaining` requests left of the burst.
    fn get(&self, burst: u32, period: Duration, remaining: u32) -> (HeaderValue, HeaderValue) {
        if let Some((rem, reset)) = self.by_remaining.get(remaining as usize) {
            return (rem.clone(), reset.clone());
        }
        let Ok(mut last) = self.last.lock() else { return Self::format(burst, period, remaining) };
        if let Some((r, rem, reset)) = &*last
            && *r == remaining
        {
            return (rem.clone(), reset.clone());
        }
        let (rem, reset) = Self::format(burst, period, remaining);
        *last = Some((remaining, rem.clone(), reset.clone()));
        (rem, reset)
    }

    fn format(burst: u32, period: Duration, remaining: u32) -> (HeaderValue, HeaderValue) {
        let reset = period * burst.saturating_sub(remaining);
        let reset = HeaderValue::from_str(&format!("{}ms", reset.as_millis()))
            .unwrap_or(HeaderValue::from_static("0ms"));
        (HeaderValue::from(remaining), reset)
    }
}

impl TenantLimiter {
    pub fn new(per_s: u32, burst: u32) -> Self {
        let per_s = NonZeroU32::new(per_s).unwrap_or(NonZeroU32::MIN);
        let burst_nz = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::per_second(per_s).allow_burst(burst_nz);
        let period = Duration::from_secs(1) / per_s.get();
        TenantLimiter {
            limiter: RateLimiter::dashmap_with_clock(quota, TokioClock)
                .with_middleware::<StateInformationMiddleware>(),
            burst: burst_nz.get(),
            period,
            headers: RateHeaders::new(burst_nz.get(), period),
        }
    }

    /// Forgets tenants whose quota is full again, so memory follows active tenants only.
    pub fn maintain(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    pub fn tenants(&self) -> usize {
        self.limiter.len()
    }
}

const LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit-requests");
const REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining-requests");
const RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset-requests");
const RETRY_AFTER_MS: HeaderName = HeaderName::from_static("retry-after-ms");

pub async fn limit(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let Some(Tenant(tenant)) = req.extensions().get::<Tenant>().cloned() else {
        return next.run(req).await;
    };
    match check(&st, &tenant) {
        Ok(admitted) => {
            let mut res = next.run(req).await;
            admitted.apply(res.headers_mut());
            res
        }
        Err(refusal) => refusal,
    }
}

/// A request the limiter let through, and the `x-ratelimit-*` values its answer carries.
pub struct Admitted {
    limit: HeaderValue,
    remaining: HeaderValue,
    reset: HeaderValue,
}

impl Admitted {
    pub fn apply(self, h: &mut http::HeaderMap) {
        h.insert(LIMIT, self.limit);
        h.insert(REMAINING, self.remaining);
        h.insert(RESET, self.reset);
    }
}

/// Takes one request from `tenant`'s quota, or answers 429 with `Retry-After`: a plain call,
/// so the chat route's own service limits without a middleware layer.
pub fn check(st: &AppState, tenant: &Arc<str>) -> Result<Admitted, Response> {
    let l = &st.limiter;
    match l.limiter.check_key(tenant) {
        Ok(snapshot) => {
            let remaining = snapshot.remaining_burst_capacity();
            let (remaining, reset) = l.headers.get(l.burst, l.period, remaining);
            Ok(Admitted { limit: l.headers.limit.clone(), remaining, reset })
        }
        Err(not_until) => {
            let wait = not_until.wait_time_from(TokioClock.now());
            st.metrics.reject("rate_limited");
            st.metrics.request("chat", 429);
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                Some("rate_limit_exceeded"),
                format!("Rate limit reached for tenant `{tenant}`: {} requests per second with a burst of {}. Retry in {} ms.", (Duration::from_secs(1).as_nanos() / l.period.as_nanos().max(1)), l.burst, wait.as_millis()),
            )
            .with_header(http::header::RETRY_AFTER, secs.max(1).to_string())
            .with_header(RETRY_AFTER_MS, wait.as_millis().to_string())
            .with_header(LIMIT, l.burst.to_string())
            .with_header(REMAINING, "0")
            .with_header(RESET, format!("{}ms", wait.as_millis()))
            .into_response())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prebuilt_headers_match_the_formatted_ones() {
        let h = RateHeaders::new(3, Duration::from_millis(500));
        assert_eq!(h.limit, "3");
        let want = [("0", "1500ms"), ("1", "1000ms"), ("2", "500ms"), ("3", "0ms")];
        for (remaining, (rem, reset)) in want.iter().enumerate() {
            assert_eq!(h.by_remaining[remaining].0, *rem);
            assert_eq!(h.by_remaining[remaining].1, *reset);
            assert_eq!(
                RateHeaders::format(3, Duration::from_millis(500), remaining as u32),
                h.by_remaining[remaining]
            );
        }
        let big = RateHeaders::new(u32::MAX, Duration::from_nanos(1));
        assert_eq!(big.by_remaining.len(), MAX_PREBUILT as usize + 1, "bounded");
    }

    #[test]
    fn values_beyond_the_prebuilt_ones_are_exact_whether_remembered_or_not() {
        let (burst, period) = (1_000_000, Duration::from_micros(1));
        let h = RateHeaders::new(burst, period);
        // The same value twice (remembered), then others and back: always the formatted one.
        for remaining in [999_999, 999_999, 5000, 999_999, 4097, 4096, 0, 4097] {
            assert_eq!(
                h.get(burst, period, remaining),
                RateHeaders::format(burst, period, remaining),
                "remaining {remaining}"
            );
        }
        assert_eq!(h.get(burst, period, 999_000).1, "1ms");
    }
}
