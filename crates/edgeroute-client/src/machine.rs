//! The steering machine: every decision the SDK makes, with no I/O.
//!
//! Split as quinn-proto splits a QUIC connection from its driver. Nothing here touches tokio,
//! hyper, a lock or a clock: every method takes `now`, randomness comes from the machine's own
//! seeded generator, and each call returns what to do next. The driver (the crate root and
//! `stream`) performs the steps — sends, waits, re-discoveries — and feeds back what happened.
//!
//! - [`Machine`]: what one client knows of the fleet — per-node failures, ejections,
//!   cool-downs, learnt first-token and answer times, placement misses per model, recent
//!   probes and pins — plus the retry budget.
//! - [`Turn`]: one request's failover ladder. [`Turn::start`], then [`Turn::on_outcome`] for
//!   each finished attempt and [`Turn::on_timer`] when the step's deadline passes, until a
//!   [`Step::Deliver`] or a [`Step::Fail`]. Outcome handling (first commit wins, blame, the
//!   budget, placement misses) lives here and nowhere else.
//! - [`Plan`]: one session's order of nodes (pinned, standby, the rest) and the moves it
//!   makes between turns (migrate hints, ejections, a persistently better standby, models that
//!   left a node).
//!
//! Invariants (property-tested below): the retry budget is never exceeded; a client error
//! (4xx) never blames a node; an ejected node is never tried first unless every candidate is
//! ejected; a placement miss is never returned to a caller while another candidate serves the
//! model.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use edgeroute_core::steer::{
    self, Backoff, PeakEwma, Probed, RetryBudget, TieMargin, TtftDeadline,
};
use edgeroute_proto::discovery::Candidate;
use edgeroute_proto::headers::MigrateHint;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::Event;
use crate::error::{AttemptReport, Attempts, ClientError, Side};

/// The machine's settings (a subset of [`crate::ClientConfig`]).
#[derive(Debug, Clone)]
pub struct Policy {
    /// A node's first-token deadline before anything is known of it.
    pub hedge_initial: Duration,
    /// The floor of every hedge deadline.
    pub hedge_min: Duration,
    /// Hedge when the first token (or a JSON answer) is later than this multiple of the node's
    /// own expected time (its learnt mean; `mean + 4 × deviation` when that is larger).
    pub hedge_multiple: f64,
    /// The ceiling of a stream's hedge deadline (and its hard first-token timeout).
    pub first_token_timeout: Duration,
    /// A JSON answer's hedge deadline on a node whose answers were never timed.
    pub json_hedge_initial: Duration,
    /// The ceiling of a JSON answer's hedge deadline.
    pub request_timeout: Duration,
    pub retry_ratio: f64,
    pub retry_floor_per_s: f64,
    pub eject_after: u32,
    pub eject_backoff: Backoff,
    /// How long a node that answered `model_not_found` for a model it was listed for is left
    /// out of that model's candidates in this client.
    pub miss_ttl: Duration,
    /// After placement misses, how long a turn keeps asking discovery again for a node that
    /// serves the model before it fails: discovery learns of an unload at once over the bus,
    /// within a probe interval without it.
    pub miss_wait: Duration,
    pub move_margin: TieMargin,
    pub move_after: u32,
    pub reprobe_interval: Duration,
    /// Never more attempts in flight from this client to a node than its capacity (its slots,
    /// from discovery's list or the node's load report): a full node is passed over for the
    /// next candidate, and when every candidate is full the turn waits for a slot, up to
    /// `first_token_timeout` from its start, then fails with
    /// [`ClientError::FleetSaturated`]. A node whose capacity is unknown (0) is not capped.
    pub respect_capacity: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            hedge_initial: Duration::from_secs(1),
            hedge_min: Duration::from_millis(40),
            hedge_multiple: 2.0,
            first_token_timeout: Duration::from_secs(3),
            json_hedge_initial: Duration::from_secs(5),
            request_timeout: Duration::from_secs(60),
            retry_ratio: 0.1,
            retry_floor_per_s: 1.0,
            eject_after: 2,
            eject_backoff: Backoff {
                base: Duration::from_secs(1),
                max: Duration::from_secs(30),
                jitter: 0.5,
            },
            miss_ttl: Duration::from_secs(30),
            miss_wait: Duration::from_secs(2),
            move_margin: TieMargin { abs_ms: 10.0, rel: 0.2 },
            move_after: 3,
            reprobe_interval: Duration::from_secs(5),
            respect_capacity: false,
        }
    }
}

/// What a request is, for its deadlines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A whole JSON answer: hedged at a multiple of the node's answer time.
    Json,
    /// A stream up to its first token: hedged at a multiple of the node's first-token time.
    Stream,
    /// A stream cut after tokens, continued elsewhere: every attempt is a retry, no hedge.
    Continuation,
}

/// How one attempt ended, classified by the driver.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The answer (JSON) or the first token (stream) arrived `after` the attempt started.
    Committed { after: Duration, hint: Option<MigrateHint> },
    /// A client error: the caller's, returned as is.
    Refused { status: u16, body: String },
    /// `model_not_found` from a node listed for the model: a placement miss, the fleet's.
    Missing { what: String },
    /// Full or leaving (429, 503, a migrate hint): elsewhere, no blame.
    Busy { what: String, retry_after: Option<Duration>, hint: Option<MigrateHint> },
    /// Broken before any byte reached the caller: elsewhere, and counted against the node.
    Failed { side: Side, what: String },
}

/// A change of a session's pinned node.
#[derive(Debug, Clone, PartialEq)]
pub struct Move {
    pub to: String,
    pub reason: String,
    /// A planned move (migrate hint, better standby, model left) rather than a failure.
    pub planned: bool,
}

/// The winning attempt of a turn.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub attempt: usize,
    pub node: Candidate,
    /// The session moves here now (its pinned node broke, or lost a hedge).
    pub moved: Option<Move>,
    /// The winner's migrate hint: the session moves before its next turn.
    pub hint: Option<MigrateHint>,
    /// A node that lost a hedge: probe it; if it is silent, eject it.
    pub suspect: Option<Candidate>,
}

/// What the driver does next.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Send the request to `node` as attempt number `attempt`; then wait for outcomes, or
    /// until `hedge_at`, whichever comes first.
    Send {
        attempt: usize,
        node: Candidate,
        hedge_at: Option<Instant>,
    },
    /// Wait for an outstanding attempt's outcome, or until `until`.
    Wait {
        until: Option<Instant>,
    },
    /// Every listed node was tried and some no longer had the model: ask discovery again
    /// (bypassing the cache) and call [`Turn::on_rediscovered`].
    Rediscover,
    /// This attempt's answer is the caller's; drop every other attempt.
    Deliver(Box<Delivery>),
    Fail(ClientError),
}

/// What this client itself concluded about a node, for sharing with other clients (router
/// replicas): the driver stamps it with wall time.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Ejected after failures seen here, for `for_` from now.
    Ejected { node: String, for_: Duration, reason: String },
    /// Served again after an ejection (this client's or another's).
    Rejoined { node: String },
}

#[derive(Debug)]
struct NodeState {
    failures: u32,
    ejected_until: Option<Instant>,
    /// Ejected by another client sharing its findings (a router replica): until then, as if
    /// ejected here; never counted as a failure here.
    remote_until: Option<Instant>,
    cooling_until: Option<Instant>,
    first_token: TtftDeadline,
    answer: TtftDeadline,
    /// The node's slots as last learnt (discovery's answer, its load report); `None` unknown.
    capacity: Option<u32>,
    /// Attempts from this client under way there (taken at send, returned by the driver when
    /// the attempt, or the stream it became, ends).
    in_flight: u32,
}

impl NodeState {
    fn new(p: &Policy) -> Self {
        NodeState {
            failures: 0,
            ejected_until: None,
            remote_until: None,
            cooling_until: None,
            capacity: None,
            in_flight: 0,
            first_token: TtftDeadline::new(p.hedge_initial, p.hedge_min, p.first_token_timeout),
            answer: TtftDeadline::new(p.json_hedge_initial, p.hedge_min, p.request_timeout),
        }
    }
}

/// How long a new pin weighs in a node's cost (fading): about one first turn. Herding is
/// sessions starting in the same instant, before their requests show in any load report.
pub const PIN_FADE: Duration = Duration::from_millis(500);

/// What one client knows of the fleet, and its retry budget.
#[derive(Debug)]
pub struct Machine {
    policy: Policy,
    origin: Instant,
    nodes: HashMap<String, NodeState>,
    budget: RetryBudget,
    rng: StdRng,
    /// (model, node) → until when the node is left out of the model's candidates.
    misses: HashMap<(String, String), Instant>,
    /// When this client pinned sessions to each node lately.
    pins: HashMap<String, Vec<Instant>>,
    /// The last answered probe of each node, and when.
    probes: HashMap<String, (Probed, Instant)>,
    events: Vec<Event>,
    /// This client's own ejections and recoveries, for sharing ([`Machine::take_verdicts`]).
    verdicts: Vec<Verdict>,
    /// Attempts beyond a request's first that the budget allowed, and refused.
    pub retries: u64,
    pub retries_denied: u64,
}

impl Machine {
    pub fn new(policy: Policy, seed: Option<u64>, now: Instant) -> Machine {
        let rng = match seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        Machine {
            budget: RetryBudget::new(
                policy.retry_ratio,
                policy.retry_floor_per_s,
                Duration::from_secs(10),
            ),
            policy,
            origin: now,
            nodes: HashMap::new(),
            rng,
            misses: HashMap::new(),
            pins: HashMap::new(),
            probes: HashMap::new(),
            events: Vec::new(),
            verdicts: Vec::new(),
            retries: 0,
            retries_denied: 0,
        }
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Decisions made since the last call, for the driver to announce.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// Uniform in [0, 1), from the machine's generator.
    pub fn draw(&mut self) -> f64 {
        self.rng.random::<f64>()
    }

    /// A new session id.
    pub fn session_id(&mut self) -> String {
        format!("s-{:016x}", self.rng.random::<u64>())
    }

    fn since(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.origin)
    }

    fn node(&mut self, id: &str) -> &mut NodeState {
        let p = &self.policy;
        self.nodes.entry(id.to_owned()).or_insert_with(|| NodeState::new(p))
    }

    /// Ejected here, or by another client whose findings this one took in.
    pub fn is_ejected(&self, id: &str, now: Instant) -> bool {
        self.nodes.get(id).is_some_and(|s| {
            s.ejected_until.is_some_and(|t| t > now) || s.remote_until.is_some_and(|t| t > now)
        })
    }

    /// Ejected only because another client said so (not by failures seen here).
    pub fn is_ejected_remotely(&self, id: &str, now: Instant) -> bool {
        self.nodes.get(id).is_some_and(|s| {
            s.ejected_until.is_none_or(|t| t <= now) && s.remote_until.is_some_and(|t| t > now)
        })
    }

    /// Another client ejected `id` for `for_` from `now`: it is treated as ejected here until
    /// then (at most `eject_backoff.max`: a remote word never ejects for longer than this
    /// client would itself), with the same fail-open rule. Local failure counts and a local
    /// ejection are left as they are. False (nothing done) for a zero duration.
    pub fn apply_remote_ejection(&mut self, id: &str, for_: Duration, now: Instant) -> bool {
        let for_ = for_.min(self.policy.eject_backoff.max);
        if for_.is_zero() {
            return false;
        }
        let until = now + for_;
        let s = self.node(id);
        s.remote_until = Some(s.remote_until.filter(|t| *t > until).unwrap_or(until));
        true
    }

    /// Another client saw `id` serve again: its remote ejection ends (a local one stays).
    pub fn clear_remote_ejection(&mut self, id: &str) {
        if let Some(s) = self.nodes.get_mut(id) {
            s.remote_until = None;
        }
    }

    /// This client's own ejections and recoveries since the last call, for sharing.
    pub fn take_verdicts(&mut self) -> Vec<Verdict> {
        std::mem::take(&mut self.verdicts)
    }

    /// The node's slots as known: learnt (discovery's fresh answer, its load report), else the
    /// candidate's figure; `None` (no cap) when neither says (0).
    fn capacity_of(&self, c: &Candidate) -> Option<u32> {
        let learnt = self.nodes.get(&c.id).and_then(|s| s.capacity);
        learnt.or((c.capacity > 0).then_some(c.capacity))
    }

    /// The node's capacity as it said last (0: unknown, no cap).
    pub fn note_capacity(&mut self, id: &str, capacity: u32) {
        self.node(id).capacity = (capacity > 0).then_some(capacity);
    }

    /// Attempts from this client under way on `id`.
    pub fn in_flight(&self, id: &str) -> u32 {
        self.nodes.get(id).map_or(0, |s| s.in_flight)
    }

    /// Whether one more attempt may go to `c` now (always, unless `respect_capacity`).
    pub fn has_room(&self, c: &Candidate) -> bool {
        !self.policy.respect_capacity
            || self.capacity_of(c).is_none_or(|cap| self.in_flight(&c.id) < cap)
    }

    /// Takes one of `c`'s slots for an attempt: false (nothing taken) when it has no room.
    pub fn take_slot(&mut self, c: &Candidate) -> bool {
        if !self.has_room(c) {
            return false;
        }
        let s = self.node(&c.id);
        s.in_flight = s.in_flight.saturating_add(1);
        true
    }

    /// An attempt on `id` (or the stream it became) ended: its slot is free again.
    pub fn release_slot(&mut self, id: &str) {
        if let Some(s) = self.nodes.get_mut(id) {
            s.in_flight = s.in_flight.saturating_sub(1);
        }
    }

    pub fn is_cooling(&self, id: &str, now: Instant) -> bool {
        self.nodes.get(id).and_then(|s| s.cooling_until).is_some_and(|t| t > now)
    }

    /// Whether `id` answered `model_not_found` for `model` lately.
    pub fn is_missing(&self, model: &str, id: &str, now: Instant) -> bool {
        self.misses.get(&(model.to_owned(), id.to_owned())).is_some_and(|t| *t > now)
    }

    /// `id` no longer serves `model` (a `model_not_found`, an unload hint, a probe that found
    /// it gone): left out of that model's candidates for `miss_ttl`, and its probe forgotten.
    /// Whether `c` answered `model_not_found` for what a request for `model` asks of it (the
    /// model itself, or the one a cascade serves in its place).
    pub fn is_missing_at(&self, model: &str, c: &Candidate, now: Instant) -> bool {
        self.is_missing(c.model_for(model), &c.id, now)
    }

    pub fn note_miss(&mut self, model: &str, id: &str, now: Instant) {
        let until = now + self.policy.miss_ttl;
        self.misses.retain(|_, t| *t > now);
        self.misses.insert((model.to_owned(), id.to_owned()), until);
        self.probes.remove(id);
        self.events.push(Event::PlacementMiss { node: id.into(), model: model.into() });
    }

    /// A node served a request: its failures are forgotten (an ejection, this client's or
    /// another's, ends) and its time learnt.
    pub fn note_ok(&mut self, id: &str, after: Duration, kind: Kind) {
        let s = self.node(id);
        s.failures = 0;
        let local = s.ejected_until.take().is_some();
        let remote = s.remote_until.take().is_some();
        if local || remote {
            self.verdicts.push(Verdict::Rejoined { node: id.into() });
        }
        let s = self.node(id);
        match kind {
            Kind::Json => s.answer.observe(after),
            Kind::Stream | Kind::Continuation => s.first_token.observe(after),
        }
    }

    /// One more hard failure of `id`, counted as at least `at_least` (to eject at once).
    pub fn note_failure(&mut self, id: &str, at_least: u32, now: Instant) {
        let draw = self.draw();
        let (after, backoff) = (self.policy.eject_after, self.policy.eject_backoff);
        let s = self.node(id);
        s.failures = s.failures.saturating_add(1).max(at_least);
        if s.failures >= after {
            let d = backoff.delay(s.failures - after + 1, draw);
            s.ejected_until = Some(now + d);
            let reason = format!("{} consecutive failures seen by this client", s.failures);
            self.events.push(Event::Ejected { node: id.into(), for_ms: d.as_millis() as u64 });
            self.verdicts.push(Verdict::Ejected { node: id.into(), for_: d, reason });
        }
    }

    /// The node asked for a pause (`Retry-After`): other nodes go first until it passes.
    pub fn cool(&mut self, id: &str, d: Duration, now: Instant) {
        self.node(id).cooling_until = Some(now + d);
    }

    pub fn record_request(&mut self, now: Instant) {
        let t = self.since(now);
        self.budget.record_request(t);
    }

    /// Takes one retry (or hedge, or continuation) from the budget.
    pub fn try_retry(&mut self, now: Instant) -> bool {
        let t = self.since(now);
        let granted = self.budget.try_retry(t);
        if granted {
            self.retries += 1;
        } else {
            self.retries_denied += 1;
        }
        granted
    }

    /// How long to wait for `node`'s first token (stream) or answer (JSON) before hedging:
    /// a multiple of what this client learnt of the node, or (before any sample) of its last
    /// probe's prediction, clamped to `[hedge_min, first_token_timeout | request_timeout]`.
    pub fn hedge_deadline(&self, node: &Candidate, kind: Kind) -> Duration {
        let p = &self.policy;
        let s = self.nodes.get(&node.id);
        let (learnt, ceiling) = match kind {
            Kind::Json => (s.and_then(|s| s.answer.estimate()), p.request_timeout),
            _ => (s.and_then(|s| s.first_token.estimate()), p.first_token_timeout),
        };
        let ms = match learnt {
            Some((mean, dev)) => (p.hedge_multiple * mean).max(mean + 4.0 * dev),
            None => match kind {
                Kind::Json => p.json_hedge_initial.as_secs_f64() * 1000.0,
                _ => match self.probes.get(&node.id) {
                    Some((probe, _)) => p.hedge_multiple * probe.predicted_ttft_ms(),
                    None => p.hedge_initial.as_secs_f64() * 1000.0,
                },
            },
        };
        let floor = p.hedge_min.min(ceiling);
        Duration::from_secs_f64(ms.max(0.0) / 1000.0).clamp(floor, ceiling)
    }

    /// A probe's result: an answer is remembered (its round trip is this client's path to the
    /// node), a failure forgets the path.
    pub fn record_probe(&mut self, id: &str, r: Result<&Probed, &str>, now: Instant) {
        match r {
            Ok(p) => {
                self.probes.insert(id.to_owned(), (p.clone(), now));
                self.events.push(Event::Probed {
                    node: id.into(),
                    rtt_ms: p.rtt.as_secs_f64() * 1000.0,
                    predicted_ttft_ms: p.predicted_ttft_ms(),
                });
            }
            Err(e) => {
                self.probes.remove(id);
                self.events.push(Event::ProbeFailed { node: id.into(), error: e.into() });
            }
        }
    }

    /// A node's answer carried its load: a remembered probe takes the node's new queue wait.
    pub fn refresh_load(&mut self, id: &str, queue_wait_ms: f64) {
        if let Some((p, _)) = self.probes.get_mut(id) {
            p.queue_wait_ms = queue_wait_ms;
        }
    }

    /// A node said it is leaving: no candidate for new sessions until probed again.
    pub fn forget_probe(&mut self, id: &str) {
        self.probes.remove(id);
    }

    /// Every candidate of `set` probed within `ttl`, if all were.
    pub fn recent_probes(
        &self,
        set: &[&Candidate],
        ttl: Duration,
        now: Instant,
    ) -> Option<Vec<(Probed, Candidate)>> {
        set.iter()
            .map(|c| {
                self.probes
                    .get(&c.id)
                    .filter(|(_, at)| now.saturating_duration_since(*at) < ttl)
                    .map(|(p, _)| (p.clone(), (*c).clone()))
            })
            .collect()
    }

    /// The candidates of `set` probed within `ttl` — their measured round trips, with the
    /// node's TTFT and queue from discovery's (fresher) figures — if at least two are (a pin
    /// and a standby).
    pub fn known_paths(
        &self,
        set: &[&Candidate],
        ttl: Duration,
        now: Instant,
    ) -> Option<Vec<(Probed, Candidate)>> {
        let known: Vec<(Probed, Candidate)> = set
            .iter()
            .filter_map(|c| {
                let (p, _) = self
                    .probes
                    .get(&c.id)
                    .filter(|(_, at)| now.saturating_duration_since(*at) < ttl)?;
                let wait = discovery_wait(c);
                Some((Probed { id: c.id.clone(), rtt: p.rtt, queue_wait_ms: wait }, (*c).clone()))
            })
            .collect();
        (known.len() >= 2.min(set.len()) && !known.is_empty()).then_some(known)
    }

    /// Sessions pinned to `id` lately, each weighing 1 when just pinned and nothing after
    /// [`PIN_FADE`].
    fn recent_pins(&mut self, id: &str, now: Instant) -> f64 {
        let ttl = PIN_FADE.as_secs_f64();
        let Some(v) = self.pins.get_mut(id) else { return 0.0 };
        v.retain(|t| now.saturating_duration_since(*t).as_secs_f64() < ttl);
        v.iter().map(|t| 1.0 - now.saturating_duration_since(*t).as_secs_f64() / ttl).sum()
    }

    pub fn note_pin(&mut self, id: &str, now: Instant) {
        self.pins.retain(|_, v| {
            v.retain(|t| now.saturating_duration_since(*t) < PIN_FADE);
            !v.is_empty()
        });
        self.pins.entry(id.to_owned()).or_default().push(now);
    }

    /// The candidates a new session may use: placement misses out (unless every candidate
    /// missed: discovery still lists them, so they are tried again), then ejected nodes out
    /// (unless every one is ejected: fail open to discovery's order).
    pub fn usable(&self, model: &str, candidates: &[Candidate], now: Instant) -> Vec<Candidate> {
        let present: Vec<&Candidate> = candidates
            .iter()
            .filter(|c| !self.is_missing(c.model_for(model), &c.id, now))
            .collect();
        let present = if present.is_empty() { candidates.iter().collect() } else { present };
        let fine: Vec<Candidate> =
            present.iter().filter(|c| !self.is_ejected(&c.id, now)).map(|c| (*c).clone()).collect();
        if fine.is_empty() { present.into_iter().cloned().collect() } else { fine }
    }

    /// A new session's order: the best probed candidate (predicted first token, each recent
    /// pin of this client counting as one more request there, [`pin_wait_ms`]; near-ties at
    /// random), the other probed ones by the same cost, then the unprobed in discovery's order.
    pub fn rank(
        &mut self,
        probed: &[(Probed, Candidate)],
        usable: &[Candidate],
        now: Instant,
    ) -> Vec<Candidate> {
        let mut order: Vec<Candidate> = Vec::new();
        if !probed.is_empty() {
            let adjusted: Vec<Probed> = probed
                .iter()
                .map(|(p, c)| {
                    let mut p = p.clone();
                    let pins = self.recent_pins(&p.id, now);
                    p.queue_wait_ms = p.queue_wait_ms.max(0.0) + pin_wait_ms(c, pins);
                    p
                })
                .collect();
            let draw = self.draw();
            if let Some(i) = steer::pick(&adjusted, TieMargin::default(), draw) {
                order.push(probed[i].1.clone());
                let mut rest: Vec<usize> = (0..probed.len()).filter(|j| *j != i).collect();
                rest.sort_by(|a, b| {
                    adjusted[*a].predicted_ttft_ms().total_cmp(&adjusted[*b].predicted_ttft_ms())
                });
                order.extend(rest.into_iter().map(|j| probed[j].1.clone()));
            }
        }
        for c in usable {
            if !order.iter().any(|o| o.id == c.id) {
                order.push(c.clone());
            }
        }
        diversify(&mut order);
        if let Some(first) = order.first() {
            let id = first.id.clone();
            self.note_pin(&id, now);
        }
        order
    }
}

/// The standby (second) sits outside the pinned node's region when any candidate does, so a
/// whole region going dark is a failover to a warm node, not a walk through dead ones.
pub fn diversify(order: &mut [Candidate]) {
    let Some(pin) = order.first().map(|c| c.region.clone()) else { return };
    if order.get(1).is_none_or(|c| c.region != pin) {
        return;
    }
    if let Some(j) = (2..order.len()).find(|j| order[*j].region != pin) {
        order[1..=j].rotate_right(1);
    }
}

/// What `pins` sessions this client started on `c` lately add to its wait, ms. Each is one more
/// request there, which its load report does not show yet. Those beyond the node's free slots
/// (by discovery's `in_flight` and `queue_depth`) queue for a slot's share of a first token, as
/// [`discovery_wait`] counts a queue. While slots are free, a pin costs nothing: the node
/// closest in time still takes the session. A burst past its free slots spills to the next.
pub fn pin_wait_ms(c: &Candidate, pins: f64) -> f64 {
    let cap = f64::from(c.capacity).max(1.0);
    let busy = f64::from(c.in_flight) + f64::from(c.queue_depth);
    let over = |n: f64| (n - cap).max(0.0);
    (over(busy + pins) - over(busy)) * c.ttft_p50_ms.max(0.0) / cap
}

/// The wait discovery's (seconds-old) figures imply for a candidate, ms.
pub fn discovery_wait(c: &Candidate) -> f64 {
    c.ttft_p50_ms + f64::from(c.queue_depth) * c.ttft_p50_ms / f64::from(c.capacity).max(1.0)
}

#[derive(Debug, Clone)]
struct Slot {
    /// Index into the turn's order.
    at: usize,
    started: Instant,
    hedge: bool,
    done: bool,
}

/// The first pause between questions to discovery after placement misses (then doubling).
const MISS_PAUSE: Duration = Duration::from_millis(50);

/// How often a turn waiting for a slot looks again when the driver says nothing sooner.
pub const ROOM_PAUSE: Duration = Duration::from_millis(25);

/// One request's failover ladder.
#[derive(Debug)]
pub struct Turn {
    model: String,
    kind: Kind,
    order: Vec<Candidate>,
    slots: Vec<Slot>,
    reports: Vec<AttemptReport>,
    hedge_at: Option<Instant>,
    hedged: bool,
    /// Why the pinned node (order[0]) cannot keep the session, and whether that is planned.
    pinned_broken: Option<(String, bool)>,
    missed: Vec<String>,
    /// When the turn started, and how often it asked discovery again.
    started: Option<Instant>,
    rediscoveries: u32,
    /// A new question to discovery is due then (after misses, while discovery catches up).
    rediscover_at: Option<Instant>,
    /// Every candidate left is full (`respect_capacity`): look again then, or sooner when the
    /// driver sees a slot freed.
    room_at: Option<Instant>,
    over: bool,
}

impl Turn {
    /// A request for `model` over `order` (the session's pinned node first). For a
    /// continuation, `order` holds the nodes that may continue (the cut one left out).
    pub fn new(model: &str, kind: Kind, order: Vec<Candidate>) -> Turn {
        Turn {
            model: model.to_owned(),
            kind,
            order,
            slots: Vec::new(),
            reports: Vec::new(),
            hedge_at: None,
            hedged: false,
            pinned_broken: None,
            missed: Vec::new(),
            started: None,
            rediscoveries: 0,
            rediscover_at: None,
            room_at: None,
            over: false,
        }
    }

    /// Nodes that answered `model_not_found` during this turn.
    pub fn misses(&self) -> &[String] {
        &self.missed
    }

    /// The attempts that ended so far.
    pub fn reports(&self) -> &[AttemptReport] {
        &self.reports
    }

    pub fn start(&mut self, m: &mut Machine, now: Instant) -> Step {
        self.started = Some(now);
        if self.kind != Kind::Continuation {
            m.record_request(now);
        }
        self.advance(m, now)
    }

    fn outstanding(&self) -> usize {
        self.slots.iter().filter(|s| !s.done).count()
    }

    fn tried(&self, at: usize) -> bool {
        self.slots.iter().any(|s| s.at == at)
    }

    /// Whether the turn is waiting for a slot on a full node (`respect_capacity`): the driver
    /// calls [`Turn::on_timer`] as soon as one is freed.
    pub fn waiting_for_room(&self) -> bool {
        self.room_at.is_some() && !self.over
    }

    /// Untried candidates that could serve but are full.
    fn full(&self, m: &Machine, now: Instant) -> Vec<usize> {
        (0..self.order.len())
            .filter(|i| !self.tried(*i) && !m.is_missing_at(&self.model, &self.order[*i], now))
            .filter(|i| !m.has_room(&self.order[*i]))
            .collect()
    }

    /// The next node to try: untried with a free slot, then (in order of preference) not
    /// cooling down, not ejected; an ejected or cooling node only when nothing else is left.
    fn next_index(&self, m: &Machine, now: Instant) -> Option<usize> {
        let open = |i: &usize| {
            !self.tried(*i)
                && !m.is_missing_at(&self.model, &self.order[*i], now)
                && m.has_room(&self.order[*i])
        };
        let all = 0..self.order.len();
        let ok = |i: &usize| {
            let id = &self.order[*i].id;
            !m.is_ejected(id, now) && !m.is_cooling(id, now)
        };
        all.clone()
            .filter(open)
            .find(ok)
            .or_else(|| all.clone().filter(open).find(|i| !m.is_ejected(&self.order[*i].id, now)))
            .or_else(|| all.clone().find(open))
    }

    /// Sends attempt to `order[at]`, taking one of its slots (the driver returns it when the
    /// attempt ends).
    fn send(&mut self, at: usize, hedge: bool, m: &mut Machine, now: Instant) -> Step {
        let attempt = self.slots.len();
        self.slots.push(Slot { at, started: now, hedge, done: false });
        let node = self.order[at].clone();
        let taken = m.take_slot(&node);
        debug_assert!(taken, "a node is chosen only with a free slot");
        // One hedge per turn, and only when another node could take it.
        self.hedge_at = (!self.hedged
            && !hedge
            && self.kind != Kind::Continuation
            && self.next_index(m, now).is_some())
        .then(|| now + m.hedge_deadline(&node, self.kind));
        Step::Send { attempt, node, hedge_at: self.hedge_at }
    }

    /// The ladder's next rung once nothing is outstanding.
    fn advance(&mut self, m: &mut Machine, now: Instant) -> Step {
        if self.over {
            return Step::Wait { until: None };
        }
        if self.outstanding() > 0 {
            return Step::Wait { until: self.hedge_at };
        }
        self.room_at = None;
        let Some(i) = self.next_index(m, now) else {
            let full = self.full(m, now);
            if !full.is_empty() {
                return self.wait_for_room(m, &full, now);
            }
            return self.give_up(m, now);
        };
        let retry = !self.slots.is_empty() || self.kind == Kind::Continuation;
        if retry && !m.try_retry(now) {
            self.over = true;
            return Step::Fail(ClientError::BudgetSpent(Attempts(self.reports.clone())));
        }
        self.send(i, false, m, now)
    }

    /// Every candidate left is full: wait for a slot (looking again every [`ROOM_PAUSE`], or
    /// when the driver sees one freed) until `first_token_timeout` after the turn started,
    /// then fail with the time the soonest of them is expected to answer as `Retry-After`.
    fn wait_for_room(&mut self, m: &Machine, full: &[usize], now: Instant) -> Step {
        let deadline = self.started.unwrap_or(now) + m.policy.first_token_timeout;
        if now < deadline {
            let at = (now + ROOM_PAUSE).min(deadline);
            self.room_at = Some(at);
            return Step::Wait { until: Some(at) };
        }
        self.over = true;
        let soonest = full
            .iter()
            .map(|i| m.hedge_deadline(&self.order[*i], self.kind))
            .min()
            .unwrap_or(m.policy.hedge_min);
        let nodes: Vec<&str> = full.iter().map(|i| self.order[*i].id.as_str()).collect();
        Step::Fail(ClientError::FleetSaturated {
            model: self.model.clone(),
            retry_after_ms: soonest.as_millis().max(1) as u64,
            reason: format!(
                "every node that could serve it is at its capacity ({}) and none freed a slot \
                 within {} ms",
                nodes.join(", "),
                m.policy.first_token_timeout.as_millis()
            ),
            attempts: Attempts(self.reports.clone()),
        })
    }

    /// No node left to try. After placement misses (or when no listed node could be tried
    /// at all) discovery is asked again at once, then again with a doubling pause while
    /// `miss_wait` lasts: its list lags an unload by up to a probe interval.
    fn give_up(&mut self, m: &Machine, now: Instant) -> Step {
        if !self.missed.is_empty() || self.slots.is_empty() {
            if self.rediscoveries == 0 {
                return Step::Rediscover;
            }
            let waited = now.saturating_duration_since(self.started.unwrap_or(now));
            if let Some(left) = m.policy.miss_wait.checked_sub(waited).filter(|d| !d.is_zero()) {
                let pause = MISS_PAUSE.saturating_mul(1 << (self.rediscoveries - 1).min(6));
                let at = now + pause.min(left);
                self.rediscover_at = Some(at);
                return Step::Wait { until: Some(at) };
            }
        }
        self.over = true;
        let attempts = Attempts(self.reports.clone());
        if self.reports.iter().all(|r| r.side == Side::Fleet) && !self.missed.is_empty() {
            return Step::Fail(ClientError::NoCandidates {
                model: self.model.clone(),
                reason: format!(
                    "every node listed for it no longer has it, and discovery lists no other ({attempts})"
                ),
            });
        }
        match self.kind {
            Kind::Continuation => Step::Fail(ClientError::StreamCut(attempts)),
            _ => Step::Fail(ClientError::Exhausted(attempts)),
        }
    }

    /// The step's deadline passed: the first attempt's first token (or answer) is late, so
    /// the next node is raced against it, budget permitting.
    pub fn on_timer(&mut self, m: &mut Machine, now: Instant) -> Step {
        if self.room_at.is_some() && !self.over && self.outstanding() == 0 {
            // Waiting for a slot: look again (a slot may have been freed before `room_at`).
            return self.advance(m, now);
        }
        if let Some(at) = self.rediscover_at {
            if at <= now && !self.over && self.outstanding() == 0 {
                self.rediscover_at = None;
                return Step::Rediscover;
            }
            return Step::Wait { until: Some(at) };
        }
        let due = self.hedge_at.is_some_and(|t| t <= now);
        if !due || self.over || self.outstanding() == 0 {
            return Step::Wait { until: self.hedge_at.filter(|_| !self.over) };
        }
        self.hedge_at = None;
        self.hedged = true;
        let Some(j) = self.next_index(m, now) else { return Step::Wait { until: None } };
        if !m.try_retry(now) {
            return Step::Wait { until: None };
        }
        let primary = self.slots.iter().rev().find(|s| !s.done).map(|s| (s.at, s.started));
        if let Some((at, started)) = primary {
            m.events.push(Event::Hedged {
                from: self.order[at].id.clone(),
                to: self.order[j].id.clone(),
                after_ms: now.saturating_duration_since(started).as_millis() as u64,
            });
        }
        self.send(j, true, m, now)
    }

    /// Attempt `attempt` ended with `outcome`.
    pub fn on_outcome(
        &mut self,
        m: &mut Machine,
        attempt: usize,
        outcome: Outcome,
        now: Instant,
    ) -> Step {
        let Some(slot) = self.slots.get_mut(attempt) else { return self.advance(m, now) };
        if slot.done || self.over {
            return Step::Wait { until: None };
        }
        slot.done = true;
        let slot = slot.clone();
        if !slot.hedge {
            // The first attempt ended: its hedge timer no longer matters.
            self.hedge_at = None;
        }
        let node = self.order[slot.at].clone();
        let pinned = slot.at == 0 && self.kind != Kind::Continuation;
        let after = now.saturating_duration_since(slot.started);
        let mut report = |side: Side, what: String| {
            self.reports.push(AttemptReport {
                node: node.id.clone(),
                side,
                what,
                after,
                hedge: slot.hedge,
            });
        };
        match outcome {
            Outcome::Committed { after, hint } => {
                m.note_ok(&node.id, after, self.kind);
                self.over = true;
                let mut suspect = None;
                let moved = match self.pinned_broken.take() {
                    Some((reason, planned)) => Some(Move { to: node.id.clone(), reason, planned }),
                    None if slot.hedge => {
                        let lost = self.slots.iter().find(|s| !s.hedge).map(|s| s.at);
                        let lost = lost.map(|i| self.order[i].clone());
                        let reason = match &lost {
                            Some(l) => format!(
                                "hedge won: no first answer from {} within {} ms",
                                l.id,
                                after.as_millis()
                            ),
                            None => "hedge won".to_owned(),
                        };
                        suspect = lost;
                        (self.kind != Kind::Continuation).then(|| Move {
                            to: node.id.clone(),
                            reason,
                            planned: false,
                        })
                    }
                    None => None,
                };
                Step::Deliver(Box::new(Delivery { attempt, node, moved, hint, suspect }))
            }
            Outcome::Refused { status, body } => {
                // The caller's error: returned as is, never held against the node.
                self.over = true;
                Step::Fail(ClientError::Api { node: node.id, status, body })
            }
            Outcome::Missing { what } => {
                m.note_miss(node.model_for(&self.model), &node.id, now);
                self.missed.push(node.id.clone());
                report(Side::Fleet, what);
                if pinned {
                    let reason = format!("{} no longer serves {}", node.id, self.model);
                    self.pinned_broken = Some((reason, true));
                }
                self.advance(m, now)
            }
            Outcome::Busy { what, retry_after, hint } => {
                if let Some(d) = retry_after {
                    m.cool(&node.id, d, now);
                }
                if pinned && let Some(h) = &hint {
                    self.pinned_broken = Some((format!("migrate hint: {}", h.reason), true));
                }
                report(Side::Node, what);
                self.advance(m, now)
            }
            Outcome::Failed { side, what } => {
                m.note_failure(&node.id, 0, now);
                if pinned {
                    self.pinned_broken = Some((what.clone(), false));
                }
                report(side, what);
                self.advance(m, now)
            }
        }
    }

    /// Discovery's fresh answer after placement misses: the nodes not tried yet join the
    /// ladder; none left means the fleet truly has no node with the model.
    pub fn on_rediscovered(
        &mut self,
        m: &mut Machine,
        list: Result<Vec<Candidate>, ClientError>,
        now: Instant,
    ) -> Step {
        self.rediscoveries += 1;
        match list {
            Ok(list) => {
                for c in list {
                    match self.order.iter().position(|o| o.id == c.id) {
                        // A cascade may now send another model to a node already listed:
                        // it is a new rung unless it was already asked for that model.
                        Some(i) if self.order[i].serve_as != c.serve_as && !self.tried(i) => {
                            self.order[i] = c;
                        }
                        Some(i) if self.order[i].serve_as != c.serve_as => self.order.push(c),
                        Some(_) => {}
                        None => self.order.push(c),
                    }
                }
                self.advance(m, now)
            }
            Err(ClientError::NoCandidates { model, reason }) => match self.give_up(m, now) {
                Step::Fail(_) => Step::Fail(ClientError::NoCandidates {
                    model,
                    reason: format!("{reason} (asked again after placement misses)"),
                }),
                wait => wait,
            },
            Err(_) => self.give_up(m, now),
        }
    }
}

/// Peak-EWMA of the predicted first-token time of the pinned node and the standby.
#[derive(Debug)]
struct Watch {
    pinned: String,
    standby: String,
    pinned_ms: PeakEwma,
    standby_ms: PeakEwma,
}

/// A finished re-probe: (pinned, standby) and what each probe gave.
type Reprobed = (String, String, Result<Probed, String>, Result<Probed, String>);

/// One session's nodes and the moves it makes between turns.
#[derive(Debug)]
pub struct Plan {
    model: String,
    /// Pinned first, then the standby, then the rest.
    order: Vec<Candidate>,
    /// A move asked for by a migrate hint: (reason, the node suggested).
    pending: Option<(String, Option<String>)>,
    watch: Option<Watch>,
    better_streak: u32,
    last_reprobe: Instant,
    /// A re-probe of (pinned, standby) under way.
    reprobing: Option<(String, String)>,
    /// A finished re-probe, weighed before the next turn.
    reprobe_done: Option<Reprobed>,
    /// When the list behind the order was received (the list cache's stamp, Unix ms).
    stamp: u64,
}

/// What a session does before a turn.
#[derive(Debug, Default)]
pub struct BeforeTurn {
    /// Re-probe these two (pinned, standby) in the background.
    pub reprobe: Option<(Candidate, Candidate)>,
}

impl Plan {
    pub fn new(model: &str, order: Vec<Candidate>, stamp: u64, now: Instant) -> Plan {
        Plan {
            model: model.to_owned(),
            order,
            pending: None,
            watch: None,
            better_streak: 0,
            last_reprobe: now,
            reprobing: None,
            reprobe_done: None,
            stamp,
        }
    }

    pub fn order(&self) -> &[Candidate] {
        &self.order
    }

    pub fn stamp(&self) -> u64 {
        self.stamp
    }

    /// Moves node `to` to the front (a new pin there); the node it replaced, if it moved.
    pub fn reorder(&mut self, m: &mut Machine, to: &str, now: Instant) -> Option<String> {
        let i = self.order.iter().position(|c| c.id == to).filter(|i| *i > 0)?;
        let from = self.order[0].id.clone();
        let node = self.order.remove(i);
        self.order.insert(0, node);
        diversify(&mut self.order);
        self.watch = None;
        self.better_streak = 0;
        m.note_pin(to, now);
        Some(from)
    }

    /// Moves node `to` to the front; announced as a failover or a planned move.
    pub fn apply(&mut self, m: &mut Machine, mv: Move, now: Instant) {
        let Some(from) = self.reorder(m, &mv.to, now) else { return };
        m.events.push(if mv.planned {
            Event::Migrated { from, to: mv.to, reason: mv.reason }
        } else {
            Event::Failover { from, to: mv.to, reason: mv.reason }
        });
    }

    /// What a turn's answer said about the session: its delivery (a move now, a hint for
    /// later), and nodes that no longer have the model.
    pub fn after_turn(
        &mut self,
        m: &mut Machine,
        d: Option<&Delivery>,
        misses: &[String],
        now: Instant,
    ) {
        if let Some(d) = d {
            if let Some(mv) = d.moved.clone() {
                self.apply(m, mv, now);
            }
            if let Some(h) = &d.hint {
                self.hint(m, &d.node.id, h, now);
            }
        }
        if !misses.is_empty() {
            self.drop_missing(m, now);
        }
    }

    /// A migrate hint from `node`: the session leaves it before its next turn (for `unload`,
    /// only sessions of that model, and the node is no candidate for it meanwhile).
    pub fn hint(&mut self, m: &mut Machine, node: &str, h: &MigrateHint, now: Instant) {
        if let Some(model) = &h.model {
            if *model != self.model {
                return;
            }
            m.note_miss(model, node, now);
        } else {
            m.forget_probe(node);
        }
        if self.order.first().is_some_and(|c| c.id == node) {
            self.pending = Some((format!("migrate hint: {}", h.reason), h.to.clone()));
        }
    }

    /// Nodes that no longer serve the model leave the order (one always stays).
    fn drop_missing(&mut self, m: &Machine, now: Instant) {
        let keep: Vec<Candidate> =
            self.order.iter().filter(|c| !m.is_missing_at(&self.model, c, now)).cloned().collect();
        if !keep.is_empty() {
            self.order = keep;
        }
    }

    /// Discovery's newer list for the session's model: known nodes take its figures and keep
    /// their place (the pin holds), new ones join at the back, nodes no longer listed leave
    /// (the pinned one too: the session moves, a planned move).
    pub fn refresh(&mut self, m: &mut Machine, fresh: &[Candidate], stamp: u64, now: Instant) {
        self.stamp = stamp;
        if fresh.is_empty() {
            return;
        }
        let pinned = self.order.first().map(|c| c.id.clone());
        let mut order: Vec<Candidate> = self
            .order
            .iter()
            .filter_map(|c| fresh.iter().find(|f| f.id == c.id).cloned())
            .collect();
        for f in fresh {
            if !order.iter().any(|o| o.id == f.id) && !m.is_missing_at(&self.model, f, now) {
                order.push(f.clone());
            }
        }
        if order.is_empty() {
            return;
        }
        if let Some(p) = pinned
            && order[0].id != p
        {
            m.events.push(Event::Migrated {
                from: p.clone(),
                to: order[0].id.clone(),
                reason: format!("{p} is no longer listed for {}", self.model),
            });
            m.note_pin(&order[0].id, now);
        }
        self.order = order;
    }

    /// Between turns: carries out a pending hint, leaves a pinned node that is ejected (a
    /// failover when this client ejected it, a planned move when only another client did) or
    /// that lost the model, and (every `reprobe_interval`) asks for a re-probe of the pinned
    /// node and the standby.
    pub fn before_turn(&mut self, m: &mut Machine, now: Instant) -> BeforeTurn {
        self.drop_missing(m, now);
        if let Some((reason, to)) = self.pending.take() {
            let target = to
                .and_then(|t| self.order.iter().position(|c| c.id == t))
                .filter(|i| *i > 0 && !m.is_ejected(&self.order[*i].id, now))
                .or_else(|| (1..self.order.len()).find(|i| !m.is_ejected(&self.order[*i].id, now)));
            if let Some(i) = target {
                let to = self.order[i].id.clone();
                self.apply(m, Move { to, reason, planned: true }, now);
                self.demote(1);
            }
        }
        if self.order.len() < 2 {
            return BeforeTurn::default();
        }
        self.weigh(m, now);
        if m.is_ejected(&self.order[0].id, now)
            && let Some(i) = (1..self.order.len()).find(|i| !m.is_ejected(&self.order[*i].id, now))
        {
            let id = &self.order[0].id;
            // On another client's word the move is planned (a migration): nothing failed
            // here and the node is not tried, so no failover is announced or counted. After
            // failures this client saw, it is a failover.
            let remote = m.is_ejected_remotely(id, now);
            let reason = if remote {
                format!("{id} ejected after failures seen by another client")
            } else {
                format!("{id} ejected after failures seen by this client")
            };
            let to = self.order[i].id.clone();
            self.apply(m, Move { to, reason, planned: remote }, now);
            self.demote(1);
            return BeforeTurn::default();
        }
        if self.reprobing.is_some()
            || now.saturating_duration_since(self.last_reprobe) < m.policy.reprobe_interval
        {
            return BeforeTurn::default();
        }
        self.last_reprobe = now;
        let (a, b) = (self.order[0].clone(), self.order[1].clone());
        self.reprobing = Some((a.id.clone(), b.id.clone()));
        BeforeTurn { reprobe: Some((a, b)) }
    }

    /// The node at `i` (the old pin) goes to the back, behind every other candidate.
    fn demote(&mut self, i: usize) {
        if i < self.order.len() && self.order.len() > 2 {
            let old = self.order.remove(i);
            self.order.push(old);
        }
    }

    /// A re-probe of the pinned node (`pa`) and the standby (`pb`) finished: weighed before
    /// the next turn (moves never happen mid-turn).
    pub fn reprobed(&mut self, pa: Result<Probed, String>, pb: Result<Probed, String>) {
        if let Some((a, b)) = self.reprobing.take() {
            self.reprobe_done = Some((a, b, pa, pb));
        }
    }

    /// A finished re-probe: a pinned node that no longer answers (or lost the model) is left
    /// at once; a standby better by the margin on `move_after` consecutive re-probes
    /// (Peak-EWMA smoothed) takes the session.
    fn weigh(&mut self, m: &mut Machine, now: Instant) {
        let Some((a, b, pa, pb)) = self.reprobe_done.take() else { return };
        if self.order.len() < 2 || self.order[0].id != a || self.order[1].id != b {
            return;
        }
        let (pa, pb) = match (pa, pb) {
            (Ok(pa), Ok(pb)) => (pa, pb),
            (Err(e), Ok(_)) => {
                let reason = format!("{a} did not answer its re-probe: {e}");
                self.apply(m, Move { to: b, reason, planned: false }, now);
                self.demote(1);
                return;
            }
            _ => {
                self.better_streak = 0;
                return;
            }
        };
        let (tau, margin, move_after) =
            (m.policy.reprobe_interval * 4, m.policy.move_margin, m.policy.move_after);
        let t = now.saturating_duration_since(m.origin);
        let secs = |x: &Probed| Duration::from_secs_f64(x.predicted_ttft_ms().max(0.0) / 1000.0);
        let mut w = match self.watch.take() {
            Some(w) if w.pinned == a && w.standby == b => w,
            _ => Watch {
                pinned: a.clone(),
                standby: b.clone(),
                pinned_ms: PeakEwma::new(tau, secs(&pa)),
                standby_ms: PeakEwma::new(tau, secs(&pb)),
            },
        };
        w.pinned_ms.observe(secs(&pa), t);
        w.standby_ms.observe(secs(&pb), t);
        let (pin_ms, standby_ms) = (w.pinned_ms.latency_ms(), w.standby_ms.latency_ms());
        let margin = margin.abs_ms.max(margin.rel * pin_ms);
        self.better_streak = if standby_ms + margin < pin_ms { self.better_streak + 1 } else { 0 };
        self.watch = Some(w);
        if self.better_streak >= move_after {
            let reason = format!(
                "standby predicted {standby_ms:.1} ms against {pin_ms:.1} ms for {move_after} re-probes"
            );
            self.apply(m, Move { to: b, reason, planned: true }, now);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
