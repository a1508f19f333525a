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
