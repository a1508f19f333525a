//! When to deliver a webhook, and again: a pure schedule. Each message (by its `webhook-id`)
//! is attempted at once, then after exponential backoff (`first_delay_ms × multiplier^n`,
//! capped at `max_delay_ms`) with jitter drawn from an injected RNG, honouring a receiver's
//! `Retry-After` when it asks for longer, until it is delivered, refused for good (410 Gone)
//! or `max_attempts` are spent. A message id already pending or recently delivered is not
//! queued again (dedupe); both sets are bounded.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::lifecycle::UnixMs;

/// The retry policy; every limit explicit.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// The delay before the second attempt.
    pub first_delay_ms: u64,
    /// Each further delay is this many times the last.
    pub multiplier: u32,
    /// No delay is longer.
    pub max_delay_ms: u64,
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// The fraction of a delay that is random: a delay `d` becomes `d × (1 − jitter × u)`
    /// with `u` uniform in [0, 1), so retries of many messages spread out.
    pub jitter: f64,
    /// Messages waiting for delivery, at most (beyond: refused, the caller reports it).
    pub max_pending: usize,
    /// Delivered ids remembered for dedupe.
    pub remember_delivered: usize,
}

impl Default for RetryPolicy {
    /// Attempts at 0, ~5 s, ~20 s, ~80 s, ~5 min, ~21 min, ~1 h, ~1 h: eight in about three
    /// hours.
    fn default() -> Self {
        RetryPolicy {
            first_delay_ms: 5_000,
            multiplier: 4,
            max_delay_ms: 60 * 60 * 1000,
            max_attempts: 8,
            jitter: 0.2,
            max_pending: 100_000,
            remember_delivered: 100_000,
        }
    }
}

impl RetryPolicy {
    /// The delay after the `attempt`-th failed attempt (1-based), before jitter.
    pub fn base_delay_ms(&self, attempt: u32) -> u64 {
        let factor = u64::from(self.multiplier).saturating_pow(attempt.saturating_sub(1));
        self.first_delay_ms.saturating_mul(factor).min(self.max_delay_ms)
    }

    /// The delay with jitter from `rng`.
    pub fn delay_ms(&self, attempt: u32, rng: &mut impl rand::RngCore) -> u64 {
        let base = self.base_delay_ms(attempt) as f64;
        // 53 random bits: a uniform draw in [0, 1).
        let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let jitter = self.jitter.clamp(0.0, 1.0);
        (base * (1.0 - jitter * u)).round() as u64
    }
}

impl RetryPolicy {
    /// What follows the `attempts`-th attempt (1-based) of a message: the one rule that both
    /// [`Deliveries`] (in memory) and the job store's webhook outbox follow.
    pub fn next(
        &self,
        attempts: u32,
        attempt: Attempt,
        now: UnixMs,
        rng: &mut impl rand::RngCore,
    ) -> Next {
        match attempt {
            Attempt::Delivered => Next::Done,
            Attempt::Gone => Next::GaveUp { attempts },
            Attempt::Failed { .. } if attempts >= self.max_attempts => Next::GaveUp { attempts },
            Attempt::Failed { retry_after_ms } => {
                let backoff = self.delay_ms(attempts, rng);
                let asked = retry_after_ms.unwrap_or(0).min(self.max_delay_ms);
                Next::RetryAt(now.saturating_add(backoff.max(asked)))
            }
        }
    }
}

/// How an attempt went, as the router saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// A 2xx answer.
    Delivered,
    /// Any other answer or no answer; `retry_after_ms` from the receiver's `Retry-After`.
    Failed {
        /// What the receiver asked for, if anything.
        retry_after_ms: Option<u64>,
    },
    /// 410 Gone: the receiver wants no more messages at this URL.
    Gone,
}

impl Attempt {
    /// Classifies an HTTP status (`None`: no answer — connection refused, timeout).
    pub fn from_status(status: Option<u16>, retry_after_ms: Option<u64>) -> Self {
        match status {
            Some(200..=299) => Attempt::Delivered,
            Some(410) => Attempt::Gone,
            _ => Attempt::Failed { retry_after_ms },
        }
    }
}

/// What happens next to a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Delivered; done.
    Done,
    /// Try again at this time.
    RetryAt(UnixMs),
    /// No more attempts (spent, or Gone); the job's status stays pollable.
    GaveUp {
        /// Attempts made.
        attempts: u32,
    },
}

/// Why a message was not queued.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EnqueueError {
    /// The id is pending or was delivered: receivers would dedupe it anyway.
    #[error("webhook {0} is already queued or delivered")]
    Duplicate(String),
    /// `max_pending` messages are waiting.
    #[error("{max} webhooks are already waiting (max_pending)")]
    Full {
        /// The limit.
        max: usize,
    },
    /// The id is not pending (report for an unknown message).
    #[error("webhook {0} is not pending")]
    Unknown(String),
}

#[derive(Clone, Debug)]
struct Pending {
    attempts: u32,
    next_at: UnixMs,
}

/// The deliveries of one router replica.
#[derive(Clone, Debug)]
pub struct Deliveries {
    policy: RetryPolicy,
    pending: BTreeMap<String, Pending>,
    by_time: BTreeSet<(UnixMs, String)>,
    delivered: BTreeSet<String>,
    delivered_order: VecDeque<String>,
}

impl Deliveries {
    /// An empty schedule.
    pub fn new(policy: RetryPolicy) -> Self {
        Deliveries {
            policy,
            pending: BTreeMap::new(),
            by_time: BTreeSet::new(),
            delivered: BTreeSet::new(),
            delivered_order: VecDeque::new(),
        }
    }

    /// Queues a message for immediate delivery.
    pub fn enqueue(&mut self, id: &str, now: UnixMs) -> Result<(), EnqueueError> {
        if self.pending.contains_key(id) || self.delivered.contains(id) {
            return Err(EnqueueError::Duplicate(id.to_owned()));
        }
        if self.pending.len() >= self.policy.max_pending {
            return Err(EnqueueError::Full { max: self.policy.max_pending });
        }
        self.pending.insert(id.to_owned(), Pending { attempts: 0, next_at: now });
        self.by_time.insert((now, id.to_owned()));
        Ok(())
    }

    /// Messages due at `now`, earliest first.
    pub fn due(&self, now: UnixMs) -> Vec<String> {
        self.by_time.iter().take_while(|(at, _)| *at <= now).map(|(_, id)| id.clone()).collect()
    }

    /// When the next message is due, if any (for the router's timer).
    pub fn next_due(&self) -> Option<UnixMs> {
        self.by_time.first().map(|(at, _)| *at)
    }

    /// Messages waiting.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Records an attempt's result and says what comes next.
    pub fn on_attempt(
        &mut self,
        id: &str,
        attempt: Attempt,
        now: UnixMs,
        rng: &mut impl rand::RngCore,
    ) -> Result<Next, EnqueueError> {
        let mut p = self.pending.remove(id).ok_or_else(|| EnqueueError::Unknown(id.to_owned()))?;
        self.by_time.remove(&(p.next_at, id.to_owned()));
        p.attempts += 1;
        let next = self.policy.next(p.attempts, attempt, now, rng);
        match next {
            Next::Done => self.remember(id),
            Next::RetryAt(at) => {
                p.next_at = at;
                self.by_time.insert((at, id.to_owned()));
                self.pending.insert(id.to_owned(), p);
            }
            Next::GaveUp { .. } => {}
        }
        Ok(next)
    }

    fn remember(&mut self, id: &str) {
        if self.policy.remember_delivered == 0 {
            return;
        }
        while self.delivered_order.len() >= self.policy.remember_delivered {
            if let Some(old) = self.delivered_order.pop_front() {
                self.delivered.remove(&old);
            }
        }
        self.delivered.insert(id.to_owned());
        self.delivered_order.push_back(id.to_owned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn failed() -> Attempt {
        Attempt::Failed { retry_after_ms: None }
    }

    #[test]
    fn delays_grow_exponentially_to_the_cap_and_jitter_only_shortens_them() {
        let p = RetryPolicy::default();
        let base: Vec<u64> = (1..=8).map(|a| p.base_delay_ms(a)).collect();
        assert_eq!(&base[..5], &[5_000, 20_000, 80_000, 320_000, 1_280_000]);
        assert!(base[5..].iter().all(|&d| d == 3_600_000));
        let mut rng = StdRng::seed_from_u64(1);
        let draws: Vec<u64> = (0..200).map(|_| p.delay_ms(2, &mut rng)).collect();
        assert!(draws.iter().all(|&d| (16_000..=20_000).contains(&d)), "{draws:?}");
        assert!(draws.iter().any(|&d| d != draws[0]), "jitter spreads retries");
    }

    #[test]
    fn a_message_is_retried_until_delivered_then_deduped() {
        let mut d = Deliveries::new(RetryPolicy { jitter: 0.0, ..RetryPolicy::default() });
        let mut rng = StdRng::seed_from_u64(2);
        d.enqueue("msg_1", 0).unwrap();
        assert_eq!(d.due(0), vec!["msg_1".to_owned()]);
        assert_eq!(d.on_attempt("msg_1", failed(), 0, &mut rng), Ok(Next::RetryAt(5_000)));
        assert!(d.due(4_999).is_empty());
        assert_eq!(d.next_due(), Some(5_000));
        // The receiver asks for longer than the backoff: honoured.
        let slow = Attempt::Failed { retry_after_ms: Some(60_000) };
        assert_eq!(d.on_attempt("msg_1", slow, 5_000, &mut rng), Ok(Next::RetryAt(65_000)));
        assert_eq!(d.on_attempt("msg_1", Attempt::Delivered, 65_000, &mut rng), Ok(Next::Done));
        assert_eq!(d.enqueue("msg_1", 70_000), Err(EnqueueError::Duplicate("msg_1".into())));
        assert_eq!(d.pending(), 0);
    }

    #[test]
    fn attempts_run_out_and_gone_stops_at_once() {
        let policy = RetryPolicy { max_attempts: 3, ..RetryPolicy::default() };
        let mut d = Deliveries::new(policy);
        let mut rng = StdRng::seed_from_u64(3);
        d.enqueue("a", 0).unwrap();
        assert!(matches!(d.on_attempt("a", failed(), 0, &mut rng), Ok(Next::RetryAt(_))));
        assert!(matches!(d.on_attempt("a", failed(), 1, &mut rng), Ok(Next::RetryAt(_))));
        assert_eq!(d.on_attempt("a", failed(), 2, &mut rng), Ok(Next::GaveUp { attempts: 3 }));
        d.enqueue("b", 0).unwrap();
        let gone = Attempt::from_status(Some(410), None);
        assert_eq!(d.on_attempt("b", gone, 0, &mut rng), Ok(Next::GaveUp { attempts: 1 }));
        assert_eq!(d.on_attempt("b", gone, 0, &mut rng), Err(EnqueueError::Unknown("b".into())));
        assert_eq!(Attempt::from_status(Some(204), None), Attempt::Delivered);
        assert_eq!(Attempt::from_status(None, None), failed());
    }

    #[test]
    fn the_pending_and_remembered_sets_are_bounded() {
        let policy = RetryPolicy { max_pending: 2, remember_delivered: 1, ..Default::default() };
        let mut d = Deliveries::new(policy);
        let mut rng = StdRng::seed_from_u64(4);
        d.enqueue("a", 0).unwrap();
        d.enqueue("b", 0).unwrap();
        assert_eq!(d.enqueue("c", 0), Err(EnqueueError::Full { max: 2 }));
        d.on_attempt("a", Attempt::Delivered, 0, &mut rng).unwrap();
        d.on_attempt("b", Attempt::Delivered, 0, &mut rng).unwrap();
        // Only the last delivered id is remembered.
        assert!(d.enqueue("b", 1).is_err());
        assert!(d.enqueue("a", 1).is_ok());
    }
}
