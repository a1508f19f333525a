//! Buffering, not shedding: who runs now, who waits, who is told to come back (pure; `now`
//! passed in, no clock, no lock, no channel).
//!
//! The router runs at most `total_in_flight` requests at once (what the fleet behind it can
//! take), and at most `tenant_in_flight` for one tenant (so one tenant's spike cannot take the
//! whole router). Past those, a request waits in its tenant's queue, bounded by
//! `tenant_queue`, until `queue_timeout` has passed; when capacity frees, interactive waiters
//! go before batch ones, then the oldest first. A request that cannot wait (its queue full) or
//! waited too long is refused with the reason and a `Retry-After`.
//!
//! Invariants (property-tested below): in-flight counts never exceed either bound; a queue
//! never exceeds its bound; every ticket ends exactly once (run, refused, expired or
//! cancelled); a batch waiter never runs while an interactive waiter that could run waits.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The bounds, every one explicit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub total_in_flight: u32,
    pub tenant_in_flight: u32,
    pub tenant_queue: u32,
    pub queue_timeout: Duration,
}

/// What kind of traffic a request is: interactive waiters are served first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Class {
    Interactive,
    Batch,
}

impl Class {
    pub fn name(self) -> &'static str {
        match self {
            Class::Interactive => "interactive",
            Class::Batch => "batch",
        }
    }
}

/// One request's place in the admission.
pub type Ticket = u64;

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The tenant already has `tenant_queue` requests waiting.
    QueueFull,
    /// It waited `queue_timeout` without capacity freeing.
    Timeout,
}

/// What becomes of a new request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Run it now; call [`Admission::release`] when it ends.
    Run(Ticket),
    /// Wait until [`Admission::release`] names the ticket, or `until` passes.
    Wait {
        ticket: Ticket,
        until: Instant,
    },
    Refused(Refusal),
}

#[derive(Debug)]
struct Waiter {
    ticket: Ticket,
    class: Class,
    until: Instant,
}

#[derive(Debug, Default)]
struct TenantState {
    in_flight: u32,
    queue: VecDeque<Waiter>,
}

#[derive(Debug)]
pub struct Admission {
    limits: Limits,
    in_flight: u32,
    tenants: HashMap<Arc<str>, TenantState>,
    next: Ticket,
}

impl Admission {
    pub fn new(limits: Limits) -> Admission {
        Admission { limits, in_flight: 0, tenants: HashMap::new(), next: 1 }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Requests running now.
    pub fn in_flight(&self) -> u32 {
        self.in_flight
    }

    /// Requests waiting now, all tenants.
    pub fn waiting(&self) -> usize {
        self.tenants.values().map(|t| t.queue.len()).sum()
    }

    fn ticket(&mut self) -> Ticket {
        let t = self.next;
        self.next += 1;
        t
    }

    /// A new request of `tenant`: run, wait or refused.
    pub fn request(&mut self, tenant: &Arc<str>, class: Class, now: Instant) -> Admit {
        let l = self.limits;
        let t = self.tenants.entry(tenant.clone()).or_default();
        // Nobody of this tenant waits ahead of it (FIFO within a tenant), and there is room.
        if t.queue.is_empty()
            && t.in_flight < l.tenant_in_flight
            && self.in_flight < l.total_in_flight
        {
            t.in_flight += 1;
            self.in_flight += 1;
            let ticket = self.ticket();
            return Admit::Run(ticket);
        }
        if t.queue.len() >= l.tenant_queue as usize {
            return Admit::Refused(Refusal::QueueFull);
        }
        let ticket = self.next;
        self.next += 1;
        let until = now + l.queue_timeout;
        let t = self.tenants.entry(tenant.clone()).or_default();
        t.queue.push_back(Waiter { ticket, class, until });
        Admit::Wait { ticket, until }
    }

    /// A running request of `tenant` ended: the waiters that run now (ticket, tenant).
    pub fn release(&mut self, tenant: &str, now: Instant) -> Vec<(Ticket, Arc<str>)> {
        if let Some(t) = self.tenants.get_mut(tenant) {
            t.in_flight = t.in_flight.saturating_sub(1);
            self.in_flight = self.in_flight.saturating_sub(1);
        }
        let started = self.promote(now);
        self.tenants.retain(|_, t| t.in_flight > 0 || !t.queue.is_empty());
        started
    }

    /// Waiters past their deadline leave their queues: each is refused (`Timeout`).
    pub fn expire(&mut self, now: Instant) -> Vec<Ticket> {
        let mut gone = Vec::new();
        for t in self.tenants.values_mut() {
            t.queue.retain(|w| {
                let keep = w.until > now;
                if !keep {
                    gone.push(w.ticket);
                }
                keep
            });
        }
        self.tenants.retain(|_, t| t.in_flight > 0 || !t.queue.is_empty());
        gone
    }

    /// A waiter gave up (its caller went away). Returns whether it was waiting.
    pub fn cancel(&mut self, tenant: &str, ticket: Ticket) -> bool {
        let Some(t) = self.tenants.get_mut(tenant) else { return false };
        let before = t.queue.len();
        t.queue.retain(|w| w.ticket != ticket);
        let was = t.queue.len() != before;
        self.tenants.retain(|_, t| t.in_flight > 0 || !t.queue.is_empty());
        was
    }

    /// The earliest deadline of a waiter, if any waits.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.tenants.values().flat_map(|t| t.queue.iter().map(|w| w.until)).min()
    }

    /// Starts waiters while there is room: interactive before batch, then the oldest ticket;
    /// a tenant at its own bound is skipped; waiters past their deadline are not started.
    fn promote(&mut self, now: Instant) -> Vec<(Ticket, Arc<str>)> {
        let l = self.limits;
        let mut started = Vec::new();
        while self.in_flight < l.total_in_flight {
            let best = self
                .tenants
                .iter()
                .filter(|(_, t)| t.in_flight < l.tenant_in_flight)
                .filter_map(|(name, t)| {
                    let w = t
                        .queue
                        .iter()
                        .filter(|w| w.until > now)
                        .min_by_key(|w| (w.class, w.ticket))?;
                    Some(((w.class, w.ticket), name.clone()))
                })
                .min_by_key(|(k, _)| *k);
            let Some(((_, ticket), name)) = best else { break };
            let Some(t) = self.tenants.get_mut(&name) else { break };
            t.queue.retain(|w| w.ticket != ticket);
            t.in_flight += 1;
            self.in_flight += 1;
            started.push((ticket, name));
        }
        started
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

    use super::*;
    use proptest::prelude::*;

    fn limits() -> Limits {
        Limits {
            total_in_flight: 3,
            tenant_in_flight: 2,
            tenant_queue: 2,
            queue_timeout: Duration::from_millis(100),
        }
    }

    fn t(name: &str) -> Arc<str> {
        Arc::from(name)
    }

    #[test]
    fn a_tenant_runs_up_to_its_bound_then_waits_then_is_refused() {
        let now = Instant::now();
        let mut a = Admission::new(limits());
        let acme = t("acme");
        assert!(matches!(a.request(&acme, Class::Interactive, now), Admit::Run(_)));
        assert!(matches!(a.request(&acme, Class::Interactive, now), Admit::Run(_)));
        let Admit::Wait { ticket: w1, .. } = a.request(&acme, Class::Interactive, now) else {
            panic!()
        };
        assert!(matches!(a.request(&acme, Class::Batch, now), Admit::Wait { .. }));
        assert_eq!(a.request(&acme, Class::Interactive, now), Admit::Refused(Refusal::QueueFull));
        // Another tenant still has room: the router's bound, not acme's, is what is left.
        assert!(matches!(a.request(&t("beta"), Class::Interactive, now), Admit::Run(_)));
        assert!(matches!(a.request(&t("gamma"), Class::Interactive, now), Admit::Wait { .. }));
        // One of acme's ends: its first waiter runs (acme is under its bound again).
        assert_eq!(a.release("acme", now), vec![(w1, acme)]);
        assert_eq!(a.in_flight(), 3);
    }

    #[test]
    fn interactive_waiters_go_first_then_the_oldest() {
        let now = Instant::now();
        let l = Limits { total_in_flight: 1, tenant_in_flight: 1, tenant_queue: 4, ..limits() };
        let mut a = Admission::new(l);
        assert!(matches!(a.request(&t("x"), Class::Interactive, now), Admit::Run(_)));
        let wait = |a: &mut Admission, who: &str, c| match a.request(&t(who), c, now) {
            Admit::Wait { ticket, .. } => ticket,
            other => panic!("{other:?}"),
        };
        let batch_old = wait(&mut a, "b1", Class::Batch);
        let inter_new = wait(&mut a, "i1", Class::Interactive);
        let inter_newer = wait(&mut a, "i2", Class::Interactive);
        let ids = |v: Vec<(Ticket, Arc<str>)>| v.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
        assert_eq!(ids(a.release("x", now)), vec![inter_new]);
        assert_eq!(ids(a.release("i1", now)), vec![inter_newer]);
        assert_eq!(ids(a.release("i2", now)), vec![batch_old]);
    }

    #[test]
    fn a_waiter_past_its_deadline_is_refused_and_never_started() {
        let now = Instant::now();
        let l = Limits { total_in_flight: 1, ..limits() };
        let mut a = Admission::new(l);
        assert!(matches!(a.request(&t("x"), Class::Interactive, now), Admit::Run(_)));
        let Admit::Wait { ticket, until } = a.request(&t("y"), Class::Interactive, now) else {
            panic!()
        };
        assert_eq!(a.next_deadline(), Some(until));
        let later = until + Duration::from_millis(1);
        assert!(a.release("x", later).is_empty(), "too late to start");
        assert_eq!(a.expire(later), vec![ticket]);
        assert_eq!((a.in_flight(), a.waiting()), (0, 0));
        assert!(!a.cancel("y", ticket));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Request(u8, bool),
        Release(u8),
        Expire(u16),
        Cancel(u8, u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..4, any::<bool>()).prop_map(|(t, b)| Op::Request(t, b)),
            (0u8..4).prop_map(Op::Release),
            (0u16..200).prop_map(Op::Expire),
            (0u8..4, 0u8..32).prop_map(|(t, k)| Op::Cancel(t, k)),
        ]
    }

    proptest! {
        /// Whatever happens, the bounds hold, every ticket ends exactly once, and a batch
        /// waiter never starts while an interactive one that could start waits.
        #[test]
        fn the_bounds_hold_and_every_ticket_ends_once(ops in proptest::collection::vec(op(), 1..300)) {
            let l = limits();
            let mut a = Admission::new(l);
            let t0 = Instant::now();
            let mut now = t0;
            let names = ["a", "b", "c", "d"];
            // ticket → (tenant, class, state): 0 waiting, 1 running, 2 ended
            let mut tickets: HashMap<Ticket, (usize, Class, u8)> = HashMap::new();
            for o in ops {
                match o {
                    Op::Request(i, batch) => {
                        let class = if batch { Class::Batch } else { Class::Interactive };
                        match a.request(&t(names[i as usize]), class, now) {
                            Admit::Run(k) => { prop_assert!(tickets.insert(k, (i as usize, class, 1)).is_none()); }
                            Admit::Wait { ticket, .. } => { prop_assert!(tickets.insert(ticket, (i as usize, class, 0)).is_none()); }
                            Admit::Refused(_) => {}
                        }
                    }
                    Op::Release(i) => {
                        let running = tickets.iter().find(|(_, (ti, _, s))| *ti == i as usize && *s == 1).map(|(k, _)| *k);
                        let Some(k) = running else { continue };
                        tickets.get_mut(&k).unwrap().2 = 2;
                        let waiting_interactive: Vec<Ticket> = tickets.iter()
                            .filter(|(_, (_, c, s))| *s == 0 && *c == Class::Interactive).map(|(k, _)| *k).collect();
                        for (s, _) in a.release(names[i as usize], now) {
                            let e = tickets.get_mut(&s).unwrap();
                            prop_assert_eq!(e.2, 0, "started a ticket that was not waiting");
                            e.2 = 1;
                            if e.1 == Class::Batch {
                                // Any interactive waiter left must be blocked by its tenant's bound.
                                for w in &waiting_interactive {
                                    let (wt, _, ws) = tickets[w];
                                    if ws == 0 {
                                        let running = tickets.values().filter(|(ti, _, st)| *ti == wt && *st == 1).count();
                                        prop_assert!(running as u32 >= l.tenant_in_flight, "a batch waiter started before an interactive one");
                                    }
                                }
                            }
                        }
                    }
                    Op::Expire(ms) => {
                        now += Duration::from_millis(u64::from(ms));
                        for k in a.expire(now) {
                            let e = tickets.get_mut(&k).unwrap();
                            prop_assert_eq!(e.2, 0);
                            e.2 = 2;
                        }
                    }
                    Op::Cancel(i, k) => {
                        let waiting: Vec<Ticket> = tickets.iter().filter(|(_, (ti, _, s))| *ti == i as usize && *s == 0).map(|(k, _)| *k).collect();
                        if let Some(&w) = waiting.get(k as usize % waiting.len().max(1)) {
                            prop_assert!(a.cancel(names[i as usize], w));
                            tickets.get_mut(&w).unwrap().2 = 2;
                        }
                    }
                }
                let running = tickets.values().filter(|(_, _, s)| *s == 1).count() as u32;
                prop_assert_eq!(a.in_flight(), running);
                prop_assert!(running <= l.total_in_flight);
                for i in 0..names.len() {
                    let r = tickets.values().filter(|(ti, _, s)| *ti == i && *s == 1).count() as u32;
                    let w = tickets.values().filter(|(ti, _, s)| *ti == i && *s == 0).count() as u32;
                    prop_assert!(r <= l.tenant_in_flight && w <= l.tenant_queue);
                }
                prop_assert_eq!(a.waiting(), tickets.values().filter(|(_, _, s)| *s == 0).count());
            }
        }
    }
}
