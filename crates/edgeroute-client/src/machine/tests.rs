//! The machine without sockets or clocks: input events → steps, for every rung of the ladder,
//! and property tests of its invariants.
#![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

use super::*;
use proptest::prelude::*;

pub(crate) fn cand(id: &str, region: &str) -> Candidate {
    Candidate {
        id: id.into(),
        region: region.into(),
        url: format!("http://{id}"),
        health: "ready".into(),
        models: vec!["m".into()],
        queue_depth: 0,
        in_flight: 0,
        capacity: 4,
        ttft_p50_ms: 20.0,
        ttft_p99_ms: 40.0,
        error_rate: 0.0,
        cost_per_1k: 0.0,
        score_ms: 20.0,
        serve_as: None,
        pool: None,
    }
}

fn fleet() -> Vec<Candidate> {
    vec![cand("tor-1", "toronto"), cand("mtl-1", "montreal"), cand("van-1", "vancouver")]
}

fn machine(t0: Instant) -> Machine {
    Machine::new(Policy::default(), Some(7), t0)
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn sent_to(s: Step) -> (String, usize, Option<Instant>) {
    match s {
        Step::Send { attempt, node, hedge_at } => (node.id, attempt, hedge_at),
        other => panic!("expected a send, got {other:?}"),
    }
}

fn delivered(s: &Step) -> &Delivery {
    match s {
        Step::Deliver(d) => d,
        other => panic!("expected a delivery, got {other:?}"),
    }
}

fn ok(after: u64) -> Outcome {
    Outcome::Committed { after: ms(after), hint: None }
}

fn failed() -> Outcome {
    Outcome::Failed { side: Side::Network, what: "connection refused".into() }
}

fn missing() -> Outcome {
    Outcome::Missing { what: "404 model_not_found".into() }
}

#[test]
fn the_pinned_node_answers_and_nothing_else_happens() {
    let t0 = Instant::now();
    let mut m = machine(t0);
    let mut turn = Turn::new("m", Kind::Stream, fleet());
    let (node, a, hedge_at) = sent_to(turn.start(&mut m, t0));
    assert_eq!((node.as_str(), a), ("tor-1", 0));
    assert_eq!(hedge_at, Some(t0 + Policy::default().hedge_initial), "nothing learnt yet");
    let d = delivered(&turn.on_outcome(&mut m, 0, ok(30), t0 + ms(30))).clone();
    assert_eq!((d.node.id.as_str(), d.moved, d.suspect), ("tor-1", None, None));
    assert_eq!(m.retries, 0);
}

#[test]
fn refused_and_reset_fail_over_at_once_and_move_the_session() {
    let t0 = Instant::now();
    let mut m = machine(t0);
    let mut turn = Turn::new("m", Kind::Json, fleet());
    turn.start(&mut m, t0);
    let (node, a, _) = sent_to(turn.on_outcome(&mut m, 0, failed(), t0 + ms(1)));
    assert_eq!((node.as_str(), a), ("mtl-1", 1), "the standby at once");
    let d = delivered(&turn.on_outcome(&mut m, 1, ok(50), t0 + ms(60))).clone();
    let mv = d.moved.unwrap();
    assert_eq!((mv.to.as_str(), mv.planned), ("mtl-1", false));
    assert_eq!(m.retries, 1);
}

#[test]
fn a_client_error_is_returned_as_is_and_never_blames_the_node() {
    let t0 = Instant::now();
    let mut m = machine(t0);
    let mut turn = Turn::new("m", Kind::Json, fleet());
    turn.start(&mut m, t0);
    let step = turn.on_outcome(
        &mut m,
        0,
        Outcome::Refused { status: 400, body: "context_length_exceeded".into() },
        t0 + ms(2),
    );
    assert!(matches!(step, Step::Fail(ClientError::Api { status: 400, .. })), "{step:?}");
    assert!(m.nodes.get("tor-1").is_none_or(|s| s.failures == 0));
    assert_eq!(m.retries, 0);
}

#[test]
fn busy_with_retry_after_cools_the_node_without_ejecting_it() {
    let t0 = Instant::now();
    let mut m = machine(t0);
    let mut turn = Turn::new("m", Kind::Json, fleet());
    turn.start(&mut m, t0);
    let busy = Outcome::Busy { what: "429".into(), retry_after: Some(ms(2000)), hint: None };
    let (node, _, _) = sent_to(turn.on_outcome(&mut m, 0, busy, t0 + ms(1)));
    assert_eq!(node, "mtl-1");
    assert!(m.is_cooling("tor-1", t0 + ms(2000)) && !m.is_cooling("tor-1", t0 + ms(2001)));
    assert!(!m.is_ejected("tor-1", t0 + ms(1)));
    let d = delivered(&turn.on_outcome(&mut m, 1, ok(5), t0 + ms(10))).clone();
    assert_eq!(d.moved, None, "a busy pinned node keeps the session");
    // The next turn starts on the standby while the pinned node cools.
    let mut next = Turn::new("m", Kind::Json, fleet());
    assert_eq!(sent_to(next.start(&mut m, t0 + ms(100))).0, "mtl-1");
}

#[test]
fn a_late_first_token_is_hedged_at_the_nodes_own_deadline_and_the_first_commit_wins() {
    let t0 = Instant::now();
    let mut m = machine(t0);
    for _ in 0..20 {
        m.note_ok("tor-1", ms(30), Kind::Stream);
    }
    let deadline = m.hedge_deadline(&fleet()[0], Kind::Stream);
    assert_eq!(deadline, ms(60), "twice the node's own first token");
    let mut turn = Turn::new("m", Kind::Stream, fleet());
    let (_, _, hedge_at) = sent_to(turn.start(&mut m, t0));
    assert_eq!(hedge_at, Some(t0 + ms(60)));
    assert_eq!(turn.on_timer(&mut m, t0 + ms(59)), Step::Wait { until: Some(t0 + ms(60)) });
    let (node, a, hedge) = sent_to(turn.on_timer(&mut m, t0 + ms(60)));
    assert_eq!((node.as_str(), a, hedge), ("mtl-1", 1, None), "one hedge per turn");
    assert!(matches!(m.take_events().as_slice(), [Event::Hedged { after_ms: 60, .. }]));
    let d = delivered(&turn.on_outcome(&mut m, 1, ok(25), t0 + ms(85))).clone();
    assert_eq!(d.moved.unwrap().to, "mtl-1");
    assert_eq!(d.suspect.unwrap().id, "tor-1", "the loser is probed");
    // The loser's late outcome changes nothing.
    assert_eq!(turn.on_outcome(&mut m, 0, ok(200), t0 + ms(200)), Step::Wait { until: None });
}

#[test]
fn a_slow_node_keeps_a_wider_deadline_than_a_fast_one() {
    let t0 = Instant::now();
    let mut m = machine(t0);
    for _ in 0..20 {
        m.note_ok("fast", ms(20), Kind::Stream);
        m.note_ok("slow", ms(300), Kind::Stream);
    }
    let fast = m.hedge_deadline(&cand("fast", "r"), Kind::Stream);
    let slow = m.hedge_deadline(&cand("slow", "r"), Kind::Stream);
    assert_eq!(fast, Policy::default().hedge_min, "floored");
    assert_eq!(slow, ms(600));
}

#[test]
fn a_json_answer_from_a_silent_node_is_hedged_long_before_the_request_timeout() {
    let t0 = Instant::now();
    let mut m = machine(t0);
    for _ in 0..20 {
        m.note_ok("tor-1", ms(400), Kind::Json);
    }
    let mut turn = Turn::new("m", Kind::Json, fleet());
    let (_, _, hedge_at) = sent_to(turn.start(&mut m, t0));
    assert_eq!(hedge_at, Some(t0 + ms(800)));
    assert_eq!(sent_to(turn.on_timer(&mut m, t0 + ms(800))).0, "mtl-1");
}

#[test]
fn a_failure_while_the_hedge_runs_waits_for_the_hedge() {
    let t0 = Instant::now();
    let mut m = machine(t0);
    let mut turn = Turn::new("m", Kind::Stream, fleet());
    turn.start(&mut m, t0);
    turn.on_timer(&mut m, t0 + ms(1000));
    assert_eq!(turn.on_outcome(&mut m, 0, failed(), t0 + ms(1001)), Step::Wait { until: None });
    let d = delivered(&turn.on_outcome(&mut m, 1, ok(40), t0 + ms(1040))).clone();
    let mv = d.moved.unwrap();
    assert_eq!((mv.to.as_str(), mv.planned), ("mtl-1", false), "the pinned node broke");
}

#[test]
fn a_placement_miss_goes_to_the_next_node_and_drops_the_node_for_that_model() {
    let t0 = Instant::now();
    let mut m = machine(t0);
    let mut turn = Turn::new("m", Kind::Stream, fleet());
    turn.start(&mut m, t0);
    let (node, _, _) = sent_to(turn.on_outcome(&mut m, 0, missing(), t0 + ms(3)));
    assert_eq!(node, "mtl-1");
    assert!(m.is_missing("m", "tor-1", t0 + ms(3)));
    assert!(!m.is_missing("other-model", "tor-1", t0 + ms(3)), "only for that model");
    assert!(m.nodes.get("tor-1").is_none_or(|s| s.failures == 0), "not the node's fault");
    let d = delivered(&turn.on_outcome(&mut m, 1, ok(30), t0 + ms(40))).clone();
    let mv = d.moved.unwrap();
    assert!(mv.planned, "a model leaving is a planned move: {mv:?}");
    assert_eq!(turn.misses(), ["tor-1"]);
    // A new session does not start there.
    assert_eq!(m.usable("m", &fleet(), t0 + ms(50))[0].id, "mtl-1");
}

#[test]
fn misses_everywhere_ask_discovery_again_before_any_404() {
    let t0 = Instant::now();
    let mut m = machine(t0);
    let mut turn = Turn::new("m", Kind::Json, fleet()[..2].to_vec());
    turn.start(&mut m, t0);
    turn.on_outcome(&mut m, 0, missing(), t0 + ms(1));
    assert_eq!(turn.on_outcome(&mut m, 1, missing(), t0 + ms(2)), Step::Rediscover);
    // Discovery knows another node with the model: it is tried.
    let step = turn.on_rediscovered(&mut m, Ok(fleet()), t0 + ms(5));
    assert_eq!(sent_to(step).0, "van-1");
    assert!(matches!(turn.on_outcome(&mut m, 2, ok(9), t0 + ms(20)), Step::Deliver(_)));
    // Discovery knows none: it is asked again, pausing longer each time, and only once
    // `miss_wait` has passed does a 404 reach the caller.
    let mut turn = Turn::new("m", Kind::Json, vec![cand("van-1", "vancouver")]);
    let mut m = machine(t0);
    turn.start(&mut m, t0);
    assert_eq!(turn.on_outcome(&mut m, 0, missing(), t0 + ms(1)), Step::Rediscover);
    let none =
        || Err(ClientError::NoCandidates { model: "m".into(), reason: "model_unknown".into() });
    let (mut now, mut asked, mut pauses) = (t0 + ms(2), 1, Vec::new());
    let mut step = turn.on_rediscovered(&mut m, none(), now);
    while let Step::Wait { until: Some(at) } = step {
        pauses.push(at.saturating_duration_since(now).as_millis());
        now = at;
        assert_eq!(turn.on_timer(&mut m, now), Step::Rediscover);
        asked += 1;
        step = turn.on_rediscovered(&mut m, none(), now);
    }
    assert!(matches!(&step, Step::Fail(ClientError::NoCandidates { .. })), "{step:?}");
    assert_eq!(&pauses[..5], [50, 100, 200, 400, 800], "{pauses:?}");
    assert!(now >= t0 + m.policy().miss_wait, "gave up after {:?}", now - t0);
    assert!(asked <= 8, "{asked} questions to discovery");
}

#[test]
fn a_lagging_discovery_is_asked_again_until_the_cascade_shows_up() {
    let t0 = Instant::now();
    let mut m = machine(t0);
    let mut turn = Turn::new("nemotron", Kind::Json, vec![cand("tor-1", "toronto")]);
    turn.start(&mut m, t0);
    assert_eq!(turn.on_outcome(&mut m, 0, missing(), t0 + ms(1)), Step::Rediscover);
    // Discovery has not noticed yet: it still lists only the node that just missed.
    let step = turn.on_rediscovered(&mut m, Ok(vec![cand("tor-1", "toronto")]), t0 + ms(3));
    let Step::Wait { until: Some(at) } = step else { panic!("{step:?}") };
    assert_eq!(turn.on_timer(&mut m, at), Step::Rediscover);
    // Now the policy's cascade: the same node and another, both serving `llama` instead.
    let cascade = |id: &str, r: &str| Candidate { serve_as: Some("llama".into()), ..cand(id, r) };
    let list = vec![cascade("tor-1", "toronto"), cascade("mtl-1", "montreal")];
    let Step::Send { node, .. } = turn.on_rediscovered(&mut m, Ok(list), at) else { panic!() };
    assert_eq!((node.id.as_str(), node.serve_as.as_deref()), ("tor-1", Some("llama")));
    assert!(!m.is_missing("llama", "tor-1", at), "it missed nemotron, not llama");
    assert!(matches!(turn.on_outcome(&mut m, 1, ok(9), at + ms(10)), Step::Deliver(_)));
}

#[test]
fn exhausted_lists_every_attempt_with_its_side() {
    let t0 = Instant::now();
    let mut m = machine(t0);
    let mut turn = Turn::new("m", Kind::Json, fleet()[..2].to_vec());
    turn.start(&mut m, t0);
    turn.on_outcome(&mut m, 0, failed(), t0 + ms(1));
    let e = match turn.on_outcome(
        &mut m,
        1,
        Outcome::Failed { side: Side::Backend, what: "HTTP 502".into() },
        t0 + ms(4),
    ) {
        Step::Fail(e) => e,
        other => panic!("{other:?}"),
    };
    let sides: Vec<Side> = e.attempts().iter().map(|a| a.side).collect();
    assert_eq!(sides, [Side::Network, Side::Backend]);
    assert!(e.retryable());
}

#[test]
fn a_continuation_spends_the_budget_on_every_attempt_and_never_hedges() {
    let t0 = Instant::now();
    let mut m = machine(t0);
    let mut turn = Turn::new("m", Kind::Continuation, fleet()[1..].to_vec());
    let (node, _, hedge) = sent_to(turn.start(&mut m, t0));
    assert_eq!((node.as_str(), hedge), ("mtl-1", None));
    assert_eq!(m.retries, 1);
    turn.on_outcome(&mut m, 0, failed(), t0 + ms(3));
    let step = turn.on_outcome(&mut m, 1, failed(), t0 + ms(6));
    assert!(matches!(step, Step::Fail(ClientError::StreamCut(_))), "{step:?}");
}

#[test]
fn an_ejected_pin_is_left_before_the_turn_and_a_hint_moves_the_session_between_turns() {
    let t0 = Instant::now();
    let mut m = machine(t0);
    let mut plan = Plan::new("m", fleet(), 0, t0);
    m.note_failure("tor-1", 2, t0);
    plan.before_turn(&mut m, t0 + ms(1));
    assert_eq!(plan.order()[0].id, "mtl-1");
    assert_eq!(plan.order().last().unwrap().id, "tor-1", "the old pin is no standby");
    // A drain hint naming a candidate: honoured at the next turn, not before.
    let h = MigrateHint {
        reason: "drain".into(),
        deadline_ms: 30_000,
        to: Some("tor-1".into()),
        model: None,
    };
    m.events.clear();
    plan.hint(&mut m, "mtl-1", &h, t0 + ms(2));
    assert_eq!(plan.order()[0].id, "mtl-1");
    m.note_failure("tor-1", 2, t0 + ms(4999));
    plan.before_turn(&mut m, t0 + ms(5000));
    assert_eq!(plan.order()[0].id, "van-1", "`to=` names an ejected node: the next candidate");
    let h = MigrateHint {
        reason: "unload".into(),
        deadline_ms: 30_000,
        to: None,
        model: Some("m".into()),
    };
    plan.hint(&mut m, "van-1", &h, t0 + ms(5001));
    assert!(m.is_missing("m", "van-1", t0 + ms(5001)), "unload: no candidate for the model");
    plan.before_turn(&mut m, t0 + ms(5002));
    assert_ne!(plan.order()[0].id, "van-1");
    assert!(plan.order().iter().all(|c| c.id != "van-1"), "dropped from the model's list");
}

#[test]
fn an_unload_hint_for_another_model_does_not_move_the_session() {
    let t0 = Instant::now();
    let mut m = machine(t0);
    let mut plan = Plan::new("m", fleet(), 0, t0);
    let h = MigrateHint {
        reason: "unload".into(),
        deadline_ms: 1000,
        to: None,
        model: Some("whisper".into()),
    };
    plan.hint(&mut m, "tor-1", &h, t0);
    plan.before_turn(&mut m, t0 + ms(10));
    assert_eq!(plan.order()[0].id, "tor-1");
}

#[test]
fn a_refreshed_list_keeps_the_pin_adds_new_nodes_and_leaves_unlisted_ones() {
    let t0 = Instant::now();
    let mut m = machine(t0);
    let mut plan = Plan::new("m", fleet()[..2].to_vec(), 0, t0);
    let fresh = vec![cand("van-1", "vancouver"), cand("tor-1", "toronto")];
    plan.refresh(&mut m, &fresh, 1, t0 + ms(10));
    let ids: Vec<&str> = plan.order().iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["tor-1", "van-1"], "mtl-1 is no longer listed");
    plan.refresh(&mut m, &[cand("van-1", "vancouver")], 2, t0 + ms(20));
    assert_eq!(plan.order()[0].id, "van-1");
    assert!(matches!(m.take_events().as_slice(), [Event::Migrated { .. }]));
}

#[test]
fn a_persistently_better_standby_takes_the_session_after_move_after_reprobes() {
    let t0 = Instant::now();
    let mut m = machine(t0);
    let mut plan = Plan::new("m", fleet(), 0, t0);
    let probe = |id: &str, ms_: u64| Ok(Probed { id: id.into(), rtt: ms(ms_), queue_wait_ms: 0.0 });
    for i in 1..=3u64 {
        let now = t0 + Duration::from_secs(5 * i);
        let b = plan.before_turn(&mut m, now);
        assert_eq!(plan.order()[0].id, "tor-1", "not before the third re-probe is weighed");
        assert!(b.reprobe.is_some());
        plan.reprobed(probe("tor-1", 80), probe("mtl-1", 10));
    }
    plan.before_turn(&mut m, t0 + Duration::from_secs(16));
    assert_eq!(plan.order()[0].id, "mtl-1");
}

fn arb_outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        (1u64..500).prop_map(ok),
        Just(failed()),
        Just(missing()),
        (400u16..500)
            .prop_filter("not 429", |s| *s != 429)
            .prop_map(|status| Outcome::Refused { status, body: String::new() }),
        proptest::option::of(0u64..5).prop_map(|s| Outcome::Busy {
            what: "busy".into(),
            retry_after: s.map(Duration::from_secs),
            hint: None,
        }),
    ]
}

/// Runs one turn with outcomes drawn in order (timers fire when nothing else is left).
fn run(
    m: &mut Machine,
    turn: &mut Turn,
    outcomes: &mut impl Iterator<Item = Outcome>,
    now: &mut Instant,
) -> (Step, Vec<String>) {
    let mut sent: Vec<String> = Vec::new();
    let mut outstanding: Vec<usize> = Vec::new();
    let mut step = turn.start(m, *now);
    for _ in 0..64 {
        *now += ms(7);
        step = match step {
            Step::Send { attempt, node, hedge_at } => {
                sent.push(node.id.clone());
                outstanding.push(attempt);
                if hedge_at.is_some() && outstanding.len() == 1 {
                    // Let the hedge timer fire once in a while.
                    turn.on_timer(m, hedge_at.unwrap_or(*now).max(*now))
                } else {
                    Step::Wait { until: None }
                }
            }
            Step::Wait { until: Some(at) } if outstanding.is_empty() => {
                *now = at.max(*now);
                turn.on_timer(m, *now)
            }
            Step::Wait { .. } => match outstanding.pop() {
                Some(a) => turn.on_outcome(m, a, outcomes.next().unwrap_or_else(failed), *now),
                None => return (step, sent),
            },
            Step::Rediscover => turn.on_rediscovered(m, Ok(vec![]), *now),
            done => return (done, sent),
        };
    }
    (step, sent)
}

proptest! {
    /// Whatever the outcomes, a turn never tries a node twice, and a 4xx never counts against
    /// a node; a placement miss reaches the caller only when no untried node serves the model.
    #[test]
    fn turns_keep_their_invariants(outcomes in proptest::collection::vec(arb_outcome(), 1..12), ejected in proptest::collection::vec(any::<bool>(), 3)) {
        let t0 = Instant::now();
        let mut m = machine(t0);
        for (i, e) in ejected.iter().enumerate() {
            if *e {
                m.note_failure(&fleet()[i].id, 2, t0);
            }
        }
        let mut now = t0 + ms(1);
        let mut turn = Turn::new("m", Kind::Stream, fleet());
        let failures_before: HashMap<String, u32> = m.nodes.iter().map(|(k, v)| (k.clone(), v.failures)).collect();
        let mut it = outcomes.clone().into_iter();
        let (end, sent) = run(&mut m, &mut turn, &mut it, &mut now);
        let mut uniq = sent.clone();
        uniq.sort();
        uniq.dedup();
        prop_assert_eq!(uniq.len(), sent.len(), "a node tried twice: {:?}", sent);
        // An ejected node is never first unless every node is.
        let all_ejected = ejected.iter().all(|e| *e);
        if let Some(first) = sent.first() && !all_ejected {
            prop_assert!(!m.is_ejected(first, t0 + ms(1)) || !failures_before.contains_key(first), "started on ejected {first}");
        }
        if let Step::Fail(ClientError::Api { node, .. }) = &end {
            let before = failures_before.get(node).copied().unwrap_or(0);
            let after = m.nodes.get(node).map_or(0, |s| s.failures);
            prop_assert!(after <= before, "a 4xx blamed {node}");
        }
        if let Step::Fail(ClientError::NoCandidates { .. }) = &end {
            prop_assert_eq!(sent.len(), fleet().len(), "a miss returned while a node was left");
        }
    }

    /// Across many turns, the attempts beyond each request's first never exceed the budget:
    /// ratio × requests + floor × window.
    #[test]
    fn the_retry_budget_is_never_exceeded(outcomes in proptest::collection::vec(arb_outcome(), 1..200)) {
        let t0 = Instant::now();
        let mut m = machine(t0);
        // Turns that wait for discovery after misses would spread them over many windows.
        m.policy.miss_wait = Duration::ZERO;
        let mut now = t0;
        let mut it = outcomes.into_iter().cycle().take(400);
        let mut requests = 0u64;
        for _ in 0..40 {
            let mut turn = Turn::new("m", Kind::Json, fleet());
            requests += 1;
            run(&mut m, &mut turn, &mut it, &mut now);
        }
        let window_s = 10.0;
        // Everything happened within one window: the whole budget is ratio × requests + floor.
        prop_assert!(now.duration_since(t0) < Duration::from_secs(10));
        let allowed = (0.1 * requests as f64 + 1.0 * window_s).floor() as u64;
        prop_assert!(m.retries <= allowed, "{} retries for {} requests", m.retries, requests);
    }
}

#[test]
fn the_standby_sits_outside_the_pinned_nodes_region() {
    let mut order = vec![
        cand("tor-1", "toronto"),
        cand("tor-2", "toronto"),
        cand("tor-3", "toronto"),
        cand("mtl-1", "montreal"),
        cand("van-1", "vancouver"),
    ];
    diversify(&mut order);
    let ids: Vec<&str> = order.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["tor-1", "mtl-1", "tor-2", "tor-3", "van-1"], "the rest keep their order");
    let mut one_region = vec![cand("tor-1", "toronto"), cand("tor-2", "toronto")];
    diversify(&mut one_region);
    assert_eq!(one_region[1].id, "tor-2", "no other region: unchanged");
}

// ---- Per-node capacity (issue 16: a node is never sent more than its slots can take) ----

fn capped(t0: Instant) -> Machine {
    Machine::new(Policy { respect_capacity: true, ..Policy::default() }, Some(7), t0)
}

fn with_capacity(id: &str, region: &str, capacity: u32) -> Candidate {
    Candidate { capacity, ..cand(id, region) }
}

#[test]
fn a_full_node_is_passed_over_for_the_next_candidate() {
    let t0 = Instant::now();
    let mut m = capped(t0);
    let order = vec![with_capacity("tor-1", "toronto", 1), cand("mtl-1", "montreal")];
    let mut first = Turn::new("m", Kind::Json, order.clone());
    assert_eq!(sent_to(first.start(&mut m, t0)).0, "tor-1");
    assert_eq!(m.in_flight("tor-1"), 1);
    // A second request while the first holds tor-1's only slot goes to mtl-1.
    let mut second = Turn::new("m", Kind::Json, order.clone());
    assert_eq!(sent_to(second.start(&mut m, t0)).0, "mtl-1");
    // The slot returned: tor-1 again.
    m.release_slot("tor-1");
    let mut third = Turn::new("m", Kind::Json, order);
    assert_eq!(sent_to(third.start(&mut m, t0)).0, "tor-1");
}

#[test]
fn without_respect_for_capacity_nothing_changes() {
    let t0 = Instant::now();
    let mut m = machine(t0);
    let order = vec![with_capacity("tor-1", "toronto", 1), cand("mtl-1", "montreal")];
    for _ in 0..3 {
        let mut turn = Turn::new("m", Kind::Json, order.clone());
        assert_eq!(sent_to(turn.start(&mut m, t0)).0, "tor-1", "the default never skips");
    }
    assert_eq!(m.in_flight("tor-1"), 3, "counted all the same");
}

#[test]
fn a_hedge_never_goes_to_a_full_node() {
    let t0 = Instant::now();
    let mut m = capped(t0);
    let order = vec![cand("tor-1", "toronto"), with_capacity("mtl-1", "montreal", 1)];
    let mut other = Turn::new("m", Kind::Stream, vec![order[1].clone()]);
    assert_eq!(sent_to(other.start(&mut m, t0)).0, "mtl-1");
    let mut turn = Turn::new("m", Kind::Stream, order);
    let (node, _, hedge_at) = sent_to(turn.start(&mut m, t0));
    assert_eq!((node.as_str(), hedge_at), ("tor-1", None), "no hedge: the only other node is full");
    assert_eq!(turn.on_timer(&mut m, t0 + Duration::from_secs(2)), Step::Wait { until: None });
    assert_eq!(m.in_flight("mtl-1"), 1);
}

#[test]
fn when_every_node_is_full_the_turn_waits_for_a_slot_then_sends() {
    let t0 = Instant::now();
    let mut m = capped(t0);
    let order = vec![with_capacity("tor-1", "toronto", 1), with_capacity("mtl-1", "montreal", 1)];
    for id in ["tor-1", "mtl-1"] {
        assert!(m.take_slot(order.iter().find(|c| c.id == id).unwrap()));
    }
    let mut turn = Turn::new("m", Kind::Stream, order);
    let step = turn.start(&mut m, t0);
    assert_eq!(step, Step::Wait { until: Some(t0 + ROOM_PAUSE) });
    assert!(turn.waiting_for_room());
    // Still full at the pause: it waits again.
    assert_eq!(
        turn.on_timer(&mut m, t0 + ROOM_PAUSE),
        Step::Wait { until: Some(t0 + ROOM_PAUSE * 2) }
    );
    // A slot freed (the driver wakes the turn before the pause ends): sent at once.
    m.release_slot("mtl-1");
    let (node, attempt, _) = sent_to(turn.on_timer(&mut m, t0 + ROOM_PAUSE + ms(3)));
    assert_eq!((node.as_str(), attempt), ("mtl-1", 0));
    assert!(!turn.waiting_for_room());
    assert_eq!(m.retries, 0, "waiting for a slot is not a retry");
}

#[test]
fn when_no_slot_frees_within_the_first_token_timeout_the_turn_fails_saturated() {
    let t0 = Instant::now();
    let mut m = capped(t0);
    let order = vec![with_capacity("tor-1", "toronto", 2), with_capacity("mtl-1", "montreal", 1)];
    for c in [&order[0], &order[0], &order[1]] {
        assert!(m.take_slot(c));
    }
    assert!(!m.take_slot(&order[0]), "a third request on two slots is refused");
    let mut turn = Turn::new("m", Kind::Json, order);
    let mut step = turn.start(&mut m, t0);
    let mut now = t0;
    let limit = Policy::default().first_token_timeout;
    while let Step::Wait { until: Some(at) } = step {
        assert!(at <= t0 + limit, "never waits past the first-token timeout");
        now = at;
        step = turn.on_timer(&mut m, now);
    }
    assert_eq!(now, t0 + limit);
    match step {
        Step::Fail(e @ ClientError::FleetSaturated { .. }) => {
            assert_eq!(e.status(), 503);
            let retry = e.retry_after().unwrap();
            assert!(retry >= Policy::default().hedge_min && retry <= limit * 20, "{retry:?}");
            let text = e.to_string();
            assert!(text.contains("tor-1") && text.contains("mtl-1"), "{text}");
        }
        other => panic!("expected FleetSaturated, got {other:?}"),
    }
    assert_eq!(m.in_flight("tor-1"), 2, "nothing taken by the failed turn");
}

#[test]
fn a_failover_skips_full_nodes_and_a_learnt_capacity_overrides_the_lists() {
    let t0 = Instant::now();
    let mut m = capped(t0);
    let order = vec![
        cand("tor-1", "toronto"),
        with_capacity("mtl-1", "montreal", 4),
        cand("van-1", "vancouver"),
    ];
    // mtl-1's load report says it has one slot, and this client holds it.
    m.note_capacity("mtl-1", 1);
    assert!(m.take_slot(&order[1]));
    let mut turn = Turn::new("m", Kind::Json, order);
    assert_eq!(sent_to(turn.start(&mut m, t0)).0, "tor-1");
    let (next, attempt, _) = sent_to(turn.on_outcome(&mut m, 0, failed(), t0 + ms(5)));
    assert_eq!((next.as_str(), attempt), ("van-1", 1), "mtl-1 is full");
    // A capacity of 0 means unknown: no cap.
    m.note_capacity("mtl-1", 0);
    assert!(m.has_room(&with_capacity("mtl-1", "montreal", 0)));
}

#[derive(Debug, Clone)]
enum CapEvent {
    /// A new request over the fleet in this order (indices rotated by the value).
    Start(usize),
    /// The oldest (or a random) outstanding attempt ends with this outcome.
    Finish(usize, Outcome),
    /// A timer fires on a waiting turn.
    Tick(usize),
    /// A node reports a new capacity (0: unknown).
    Capacity(usize, u32),
}

fn arb_cap_event() -> impl Strategy<Value = CapEvent> {
    prop_oneof![
        (0usize..3).prop_map(CapEvent::Start),
        (any::<usize>(), arb_outcome()).prop_map(|(i, o)| CapEvent::Finish(i, o)),
        any::<usize>().prop_map(CapEvent::Tick),
        (0usize..3, 0u32..4).prop_map(|(n, c)| CapEvent::Capacity(n, c)),
    ]
}

proptest! {
    /// Across random sequences of requests starting, attempts ending (the driver returning
    /// their slots), hedge and wait timers and capacity reports, a send never leaves more
    /// attempts in flight to a node than its capacity as known at that moment; the machine's
    /// count is exactly the attempts under way; a capacity lowered below what is in flight
    /// admits nothing more there until it drains.
    #[test]
    fn in_flight_to_a_node_never_exceeds_its_capacity(
        caps in proptest::collection::vec(0u32..4, 3),
        events in proptest::collection::vec(arb_cap_event(), 1..120),
    ) {
        let t0 = Instant::now();
        let mut m = capped(t0);
        let ids = ["tor-1", "mtl-1", "van-1"];
        let regions = ["toronto", "montreal", "vancouver"];
        let fleet: Vec<Candidate> =
            (0..3).map(|i| with_capacity(ids[i], regions[i], caps[i])).collect();
        // The capacity the test knows for each node (None: no cap).
        let mut known: Vec<Option<u32>> = caps.iter().map(|c| (*c > 0).then_some(*c)).collect();
        let mut turns: Vec<Turn> = Vec::new();
        // (turn, attempt, node) under way.
        let mut outstanding: Vec<(usize, usize, String)> = Vec::new();
        let mut now = t0;
        for ev in events {
            now += ms(3);
            let mut steps: Vec<(usize, Step)> = Vec::new();
            match ev {
                CapEvent::Start(r) => {
                    let mut order = fleet.clone();
                    order.rotate_left(r);
                    let mut t = Turn::new("m", Kind::Stream, order);
                    let s = t.start(&mut m, now);
                    turns.push(t);
                    steps.push((turns.len() - 1, s));
                }
                CapEvent::Finish(i, o) if !outstanding.is_empty() => {
                    let (t, a, node) = outstanding.remove(i % outstanding.len());
                    m.release_slot(&node);
                    steps.push((t, turns[t].on_outcome(&mut m, a, o, now)));
                }
                CapEvent::Finish(..) => {}
                CapEvent::Tick(i) if !turns.is_empty() => {
                    let t = i % turns.len();
                    steps.push((t, turns[t].on_timer(&mut m, now)));
                }
                CapEvent::Tick(_) => {}
                CapEvent::Capacity(n, c) => {
                    m.note_capacity(ids[n], c);
                    // 0 says nothing: the list's figure stands.
                    known[n] = if c > 0 { Some(c) } else { (caps[n] > 0).then_some(caps[n]) };
                }
            }
            for (t, s) in steps {
                match s {
                    Step::Send { attempt, node, .. } => {
                        let n = ids.iter().position(|i| *i == node.id).unwrap();
                        let before = outstanding.iter().filter(|o| o.2 == node.id).count() as u32;
                        if let Some(cap) = known[n] {
                            prop_assert!(before < cap, "sent to {} with {before} of {cap} slots taken", node.id);
                        }
                        outstanding.push((t, attempt, node.id.clone()));
                    }
                    // A delivered or failed turn drops its other attempts: their slots return.
                    Step::Deliver(_) | Step::Fail(_) => {
                        outstanding.retain(|o| {
                            if o.0 == t {
                                m.release_slot(&o.2);
                            }
                            o.0 != t
                        });
                    }
                    _ => {}
                }
            }
            for (n, id) in ids.iter().enumerate() {
                let held = outstanding.iter().filter(|o| o.2 == *id).count() as u32;
                prop_assert_eq!(m.in_flight(id), held, "the machine's count of {}", id);
                if let Some(cap) = known[n] {
                    prop_assert_eq!(m.has_room(&fleet[n]), held < cap);
                }
            }
        }
    }
}

// ---- Ejections shared between clients (router replicas) ----

#[test]
fn a_remote_ejection_keeps_the_node_from_going_first_until_its_time() {
    let t0 = Instant::now();
    let mut m = machine(t0);
    assert!(m.apply_remote_ejection("tor-1", ms(500), t0));
    assert!(m.is_ejected("tor-1", t0 + ms(499)) && m.is_ejected_remotely("tor-1", t0));
    let mut turn = Turn::new("m", Kind::Json, fleet());
    assert_eq!(sent_to(turn.start(&mut m, t0 + ms(10))).0, "mtl-1");
    assert!(!m.is_ejected("tor-1", t0 + ms(500)), "never past its until");
    let mut later = Turn::new("m", Kind::Json, fleet());
    assert_eq!(sent_to(later.start(&mut m, t0 + ms(500))).0, "tor-1");
    assert!(m.take_verdicts().is_empty(), "a remote ejection is not this client's to share");
}

#[test]
fn every_node_ejected_remotely_fails_open_as_local_ejection_does() {
    let t0 = Instant::now();
    let mut m = machine(t0);
    for c in fleet() {
        m.apply_remote_ejection(&c.id, Duration::from_secs(5), t0);
    }
    let mut turn = Turn::new("m", Kind::Json, fleet());
    assert_eq!(sent_to(turn.start(&mut m, t0)).0, "tor-1", "discovery's order");
    assert_eq!(m.usable("m", &fleet(), t0).len(), 3);
}

#[test]
fn local_state_wins_over_a_remote_word() {
    let t0 = Instant::now();
    let mut m = machine(t0);
    // One local failure: not ejected yet (eject_after 2).
    m.note_failure("tor-1", 0, t0);
    // A remote ejection and its clear leave the local count as it was.
    m.apply_remote_ejection("tor-1", ms(100), t0);
    m.clear_remote_ejection("tor-1");
    assert!(!m.is_ejected("tor-1", t0));
    assert_eq!(m.nodes["tor-1"].failures, 1, "the local count is untouched");
    m.note_failure("tor-1", 0, t0);
    assert!(m.is_ejected("tor-1", t0), "the second local failure ejects, as before");
    let local_until = m.nodes["tor-1"].ejected_until.unwrap();
    // A remote clear never ends a local ejection.
    m.clear_remote_ejection("tor-1");
    assert!(m.is_ejected("tor-1", t0) && !m.is_ejected_remotely("tor-1", t0));
    assert_eq!(m.nodes["tor-1"].ejected_until, Some(local_until));
    // A remote ejection is capped at this client's own longest backoff.
    assert!(m.apply_remote_ejection("mtl-1", Duration::from_secs(3600), t0));
    let cap = Policy::default().eject_backoff.max;
    assert!(m.is_ejected("mtl-1", t0 + cap - ms(1)) && !m.is_ejected("mtl-1", t0 + cap));
    assert!(!m.apply_remote_ejection("van-1", Duration::ZERO, t0), "nothing to apply");
    assert!(!m.is_ejected("van-1", t0));
}

#[test]
fn this_clients_ejections_and_recoveries_are_offered_for_sharing() {
    let t0 = Instant::now();
    let mut m = machine(t0);
    m.note_failure("tor-1", 0, t0);
    assert!(m.take_verdicts().is_empty(), "one failure ejects nothing");
    m.note_failure("tor-1", 0, t0);
    let v = m.take_verdicts();
    assert_eq!(v.len(), 1);
    let Verdict::Ejected { node, for_, reason } = &v[0] else { panic!("{v:?}") };
    assert_eq!(node, "tor-1");
    assert!(m.is_ejected("tor-1", t0 + *for_ - ms(1)) && !m.is_ejected("tor-1", t0 + *for_));
    assert!(reason.contains("2 consecutive failures"), "{reason}");
    // It served again (fail-open, or after its time): its recovery is shared once.
    m.note_ok("tor-1", ms(20), Kind::Json);
    assert_eq!(m.take_verdicts(), vec![Verdict::Rejoined { node: "tor-1".into() }]);
    m.note_ok("tor-1", ms(20), Kind::Json);
    assert!(m.take_verdicts().is_empty());
    // A node only another client ejected that serves here: the remote word ends, and is
    // answered with a recovery.
    m.apply_remote_ejection("mtl-1", ms(500), t0);
    m.note_ok("mtl-1", ms(20), Kind::Json);
    assert!(!m.is_ejected("mtl-1", t0));
    assert_eq!(m.take_verdicts(), vec![Verdict::Rejoined { node: "mtl-1".into() }]);
}

#[test]
fn a_session_pinned_to_a_remotely_ejected_node_leaves_it_before_its_next_turn() {
    let t0 = Instant::now();
    let mut m = machine(t0);
    let mut plan = Plan::new("m", fleet(), 0, t0);
    m.apply_remote_ejection("tor-1", Duration::from_secs(5), t0);
    plan.before_turn(&mut m, t0 + ms(1));
    assert_eq!(plan.order()[0].id, "mtl-1");
    let events = m.take_events();
    assert!(
        events.iter().any(|e| matches!(e, Event::Migrated { from, to, reason }
            if from == "tor-1" && to == "mtl-1" && reason.contains("another client"))),
        "{events:?}"
    );
}

#[test]
fn leaving_a_remotely_ejected_pin_is_no_failover_nothing_failed_here() {
    // Issue 16 (router replicas): the session moves on another client's word before its turn;
    // no request of this client failed, and the node is never tried. A failover announced for
    // it would count a failure this client never saw (the router's failover count).
    let t0 = Instant::now();
    let mut m = machine(t0);
    let mut plan = Plan::new("m", fleet(), 0, t0);
    m.apply_remote_ejection("tor-1", Duration::from_secs(5), t0);
    let now = t0 + ms(1);
    plan.before_turn(&mut m, now);
    let mut turn = Turn::new("m", Kind::Json, plan.order().to_vec());
    let (node, attempt, _) = sent_to(turn.start(&mut m, now));
    assert_eq!((node.as_str(), attempt), ("mtl-1", 0), "tor-1 is not tried at all");
    let d = delivered(&turn.on_outcome(&mut m, 0, ok(30), now + ms(30))).clone();
    assert_eq!(d.moved, None, "the turn itself moved nothing");
    plan.after_turn(&mut m, Some(&d), turn.misses(), now + ms(30));
    let events = m.take_events();
    assert!(!events.iter().any(|e| matches!(e, Event::Failover { .. })), "{events:?}");
    assert_eq!(
        events.iter().filter(|e| matches!(e, Event::Migrated { .. })).count(),
        1,
        "one planned move: {events:?}"
    );
    assert!(m.is_ejected("tor-1", now), "a success elsewhere leaves the remote word as it was");
    // A local ejection (failures this client saw) still moves its other sessions as a
    // failover.
    let mut m = machine(t0);
    let mut plan = Plan::new("m", fleet(), 0, t0);
    m.note_failure("tor-1", 2, t0);
    plan.before_turn(&mut m, now);
    let events = m.take_events();
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Failover { reason, .. } if reason.contains("this client"))),
        "{events:?}"
    );
}

/// A burst of new sessions on an idle fleet, all in the same instant (no load report shows
/// them yet): the closest node takes as many as it has free slots, and the rest spill to the
/// next one instead of queueing there. Before, a recent pin scaled the node's reported wait,
/// which is zero on an idle node, so the whole burst went to one node.
#[test]
fn a_burst_of_new_sessions_fills_the_closest_nodes_free_slots_then_spills() {
    let t0 = Instant::now();
    let mut m = machine(t0);
    let near = cand("van-1", "vancouver"); // capacity 4, first token 20 ms
    let far = cand("sea-1", "seattle");
    let probed = vec![
        (Probed { id: "van-1".into(), rtt: ms(5), queue_wait_ms: 0.0 }, near.clone()),
        (Probed { id: "sea-1".into(), rtt: ms(12), queue_wait_ms: 0.0 }, far.clone()),
    ];
    let usable = vec![near.clone(), far.clone()];
    let firsts: Vec<String> = (0..12).map(|_| m.rank(&probed, &usable, t0)[0].id.clone()).collect();
    assert!(firsts[..4].iter().all(|id| id == "van-1"), "free slots first: {firsts:?}");
    let spilled = firsts.iter().filter(|id| *id == "sea-1").count();
    assert!(spilled >= 4, "the burst spills to the next node: {firsts:?}");
    assert!(firsts.iter().filter(|id| *id == "van-1").count() >= 5, "{firsts:?}");

    // Once the pins fade, the closest node is first again.
    assert_eq!(m.rank(&probed, &usable, t0 + PIN_FADE)[0].id, "van-1");

    // A node already full by discovery's figures pays from its first pin.
    let full = Candidate { in_flight: 4, ..near.clone() };
    assert_eq!(pin_wait_ms(&full, 1.0), 5.0);
    assert_eq!(pin_wait_ms(&near, 1.0), 0.0);
    assert_eq!(pin_wait_ms(&near, 5.0), 5.0);
}
