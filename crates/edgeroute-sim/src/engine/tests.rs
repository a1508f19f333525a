//! Engine tests on a paused tokio clock: every duration asserted here is exact.

use super::*;
use crate::text::{expected_answer, expected_completion};
use edgeroute_proto::{ChatMessage, Role};
use tokio::time::timeout;

fn req(text: &str) -> ChatCompletionRequest {
    ChatCompletionRequest::new("sim-llama", vec![ChatMessage::new(Role::User, text)])
}

fn sim(cfg: SimConfig) -> Arc<Simulator> {
    Arc::new(Simulator::new(cfg).unwrap())
}

/// Default timing, one GPU with `slots`, answers of exactly `tokens` tokens.
fn cfg(slots: u32, tokens: u32) -> SimConfig {
    SimConfig {
        gpus: vec![GpuConfig { slots, ..GpuConfig::new("gpu0") }],
        min_answer_tokens: tokens,
        max_answer_tokens: tokens,
        ..SimConfig::default()
    }
}

/// Reads every event, returning the tokens and the last item (finish or error), if any.
async fn drain(mut g: Generation) -> (Vec<String>, Option<Result<SimEvent, SimError>>) {
    let mut tokens = Vec::new();
    while let Some(ev) = g.next().await {
        match ev {
            Ok(SimEvent::Token(t)) => tokens.push(t.to_owned()),
            other => {
                assert!(g.next().await.is_none(), "items after the end: {other:?}");
                return (tokens, Some(other));
            }
        }
    }
    (tokens, None)
}

fn faults(f: Faults) -> SimConfig {
    SimConfig { faults: f, ..SimConfig::zero_latency() }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[tokio::test(start_paused = true)]
async fn same_request_same_tokens_different_seed_different_tokens() {
    let s = sim(SimConfig::zero_latency());
    let (a, end) = drain(s.generate(&req("hello")).await.unwrap()).await;
    let (b, _) = drain(s.generate(&req("hello")).await.unwrap()).await;
    assert_eq!(a, b);
    assert_eq!(a, expected_answer(s.config(), &req("hello")));
    let usage = Usage::new(5, a.len() as u32);
    assert_eq!(end, Some(Ok(SimEvent::Finish { reason: FinishReason::Stop, usage })));

    let mut seeded = req("hello");
    seeded.seed = Some(42);
    let (c, _) = drain(s.generate(&seeded).await.unwrap()).await;
    assert_ne!(a, c);
    let other = sim(SimConfig { seed: 9, ..SimConfig::zero_latency() });
    let (d, _) = drain(other.generate(&req("hello")).await.unwrap()).await;
    assert_ne!(a, d);
}

#[tokio::test(start_paused = true)]
async fn a_cut_stream_continued_on_another_node_yields_exactly_the_rest() {
    let mut r = req("explain routing");
    r.seed = Some(5);
    let full = expected_answer(&SimConfig::zero_latency(), &r);
    let node_a = sim(faults(Faults { cut_after_tokens: Some(7), ..Faults::default() }));
    let (got, end) = drain(node_a.generate(&r).await.unwrap()).await;
    assert_eq!(got, full[..7]);
    assert_eq!(end, Some(Err(SimError::Cut { after: 7 })));

    let node_b = sim(SimConfig::zero_latency());
    let mut cont = r.clone();
    cont.messages.push(ChatMessage::new(Role::Assistant, got.concat()));
    cont.continue_final_message = Some(true);
    let g = node_b.generate(&cont).await.unwrap();
    // The prefix is prefilled too: 4 + 2 words, plus 4 + 7 words.
    assert_eq!(g.prompt_tokens(), 17);
    let (rest, end) = drain(g).await;
    assert_eq!([got, rest].concat(), full);
    let usage = Usage::new(17, full.len() as u32 - 7);
    assert_eq!(end, Some(Ok(SimEvent::Finish { reason: FinishReason::Stop, usage })));
}

#[tokio::test(start_paused = true)]
async fn a_fully_continued_answer_finishes_at_the_commit_point() {
    let s = sim(SimConfig::zero_latency());
    let mut r = req("hi");
    r.messages.push(ChatMessage::new(Role::Assistant, expected_answer(s.config(), &r).concat()));
    r.continue_final_message = Some(true);
    let (tokens, end) = drain(s.generate(&r).await.unwrap()).await;
    assert!(tokens.is_empty());
    assert!(
        matches!(end, Some(Ok(SimEvent::Finish { reason: FinishReason::Stop, usage })) if usage.completion_tokens == 0)
    );
}

#[tokio::test(start_paused = true)]
async fn token_caps_finish_with_length() {
    let s = sim(SimConfig::zero_latency());
    let mut r = req("hello");
    r.max_tokens = Some(3);
    let (tokens, end) = drain(s.generate(&r).await.unwrap()).await;
    assert_eq!(tokens, expected_answer(s.config(), &r)[..3]);
    let usage = Usage::new(5, 3);
    assert_eq!(end, Some(Ok(SimEvent::Finish { reason: FinishReason::Length, usage })));
    r.max_completion_tokens = Some(1);
    let c = s.generate(&r).await.unwrap().into_completion().await.unwrap();
    assert_eq!(c.text, expected_completion(s.config(), &r).text());
    assert_eq!((c.finish_reason, c.usage.completion_tokens), (FinishReason::Length, 1));
}

#[tokio::test(start_paused = true)]
async fn ttft_and_token_pacing_follow_the_timing_model() {
    // 40 ms base + 200 us × (4 + 6 words) = 42 ms; then a token every 20 ms (50 tokens/s).
    let s = sim(cfg(4, 5));
    let t0 = Instant::now();
    let mut g = s.generate(&req("one two three four five six")).await.unwrap();
    assert_eq!(t0.elapsed(), ms(42));
    assert_eq!((g.ttft(), g.queue_wait()), (ms(42), Duration::ZERO));
    let mut at = Vec::new();
    loop {
        let token = matches!(g.next().await, Some(Ok(SimEvent::Token(_))));
        at.push((t0.elapsed(), token));
        if !token {
            break;
        }
    }
    // Yielding the finish gives the slot back, before the stream is read to its end.
    assert_eq!(s.in_flight(), 0);
    assert!(g.next().await.is_none());
    assert_eq!(
        at,
        vec![
            (ms(42), true),
            (ms(62), true),
            (ms(82), true),
            (ms(102), true),
            (ms(122), true),
            (ms(122), false)
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn per_model_timing_overrides_apply() {
    let mut c = cfg(4, 3);
    c.models[0].ttft_base_ms = Some(100);
    c.models[0].prefill_us_per_token = Some(0);
    c.models[0].tokens_per_s = Some(10.0);
    let s = sim(c);
    let t0 = Instant::now();
    let g = s.generate(&req("hi")).await.unwrap();
    assert_eq!(t0.elapsed(), ms(100));
    drain(g).await;
    assert_eq!(t0.elapsed(), ms(300));
}

#[tokio::test(start_paused = true)]
async fn one_slot_serves_requests_in_arrival_order_and_reports_the_queue() {
    // Each stream holds the slot for 42 ms of TTFT + 4 gaps of 20 ms = 122 ms.
    let s = sim(cfg(1, 5));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..3 {
        let s = Arc::clone(&s);
        // Prompts of equal length, so every TTFT is 42 ms.
        let r = req(&format!("request number {i} a b c"));
        tasks.push(tokio::spawn(async move {
            let g = s.generate(&r).await.unwrap();
            let committed = t0.elapsed();
            let waited = g.queue_wait();
            drain(g).await;
            (committed, waited, t0.elapsed())
        }));
        tokio::task::yield_now().await;
    }
    let st = &s.gpu_status()[0];
    assert_eq!((st.slots, st.busy, st.queued), (1, 1, 2));
    assert_eq!((s.in_flight(), s.queue_depth(), s.capacity()), (1, 2, 1));
    assert_eq!(st.utilization(), 1.0);

    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    assert_eq!(
        results,
        vec![(ms(42), ms(0), ms(122)), (ms(164), ms(122), ms(244)), (ms(286), ms(244), ms(366)),]
    );
    assert_eq!((s.in_flight(), s.queue_depth()), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn dropping_a_stream_frees_its_slot_at_once() {
    let s = sim(cfg(1, 5));
    let g = s.generate(&req("a")).await.unwrap();
    assert_eq!(s.in_flight(), 1);
    drop(g);
    assert_eq!(s.in_flight(), 0);

    // With a waiter, the slot passes to it the moment the holder is dropped.
    let g = s.generate(&req("a")).await.unwrap();
    let waiter = {
        let s = Arc::clone(&s);
        tokio::spawn(async move {
            let t = Instant::now();
            let _g = s.generate(&req("b")).await.unwrap();
            t.elapsed()
        })
    };
    tokio::time::sleep(ms(1000)).await;
    assert_eq!(s.queue_depth(), 1);
    drop(g);
    // Queued for 1000 ms, then its own TTFT of 40 + 200 us × 5 = 41 ms.
    assert_eq!(waiter.await.unwrap(), ms(1041));
}

#[tokio::test(start_paused = true)]
async fn cancelling_a_queued_request_gives_back_its_place() {
    let s = sim(cfg(1, 5));
    let _held = s.generate(&req("a")).await.unwrap();
    assert!(timeout(ms(10), s.generate(&req("b"))).await.is_err());
    assert_eq!((s.in_flight(), s.queue_depth()), (1, 0));
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_is_overloaded() {
    let s = sim(SimConfig { max_queue: 1, ..cfg(1, 5) });
    let _held = s.generate(&req("a")).await.unwrap();
    let queued = {
        let s = Arc::clone(&s);
        tokio::spawn(async move { s.generate(&req("b")).await.map(drop) })
    };
    tokio::task::yield_now().await;
    assert_eq!(s.queue_depth(), 1);
    let t0 = Instant::now();
    let err = s.generate(&req("c")).await.unwrap_err();
    assert_eq!(err, SimError::Overloaded { gpu: "gpu0".into(), queued: 1 });
    assert_eq!(t0.elapsed(), Duration::ZERO);
    queued.abort();
}

#[tokio::test(start_paused = true)]
async fn max_queue_zero_refuses_anything_beyond_the_slots() {
    let s = sim(SimConfig { max_queue: 0, ..cfg(2, 5) });
    let _a = s.generate(&req("a")).await.unwrap();
    let _b = s.generate(&req("b")).await.unwrap();
    assert!(matches!(s.generate(&req("c")).await, Err(SimError::Overloaded { .. })));
}

#[tokio::test(start_paused = true)]
async fn unknown_model_fails_at_once() {
    let s = sim(SimConfig::default());
    let mut r = req("a");
    r.model = "gpt-nope".into();
    assert_eq!(s.generate(&r).await.unwrap_err(), SimError::UnknownModel("gpt-nope".into()));
}

/// A one-message request of exactly `tokens` prompt tokens (4 framing + words).
fn sized(tokens: u32) -> ChatCompletionRequest {
    req(&"w ".repeat(tokens as usize - 4))
}

fn too_long(window: u32, prompt_tokens: u32, requested: Option<u32>) -> SimError {
    SimError::ContextLengthExceeded { model: "sim-llama".into(), window, prompt_tokens, requested }
}

#[tokio::test(start_paused = true)]
async fn a_prompt_just_under_or_at_the_window_is_served_one_over_is_refused() {
    let s = sim(SimConfig { context_window: 100, ..cfg(1, 3) });
    assert_eq!(crate::prompt_tokens(&sized(100).messages), 100);
    s.generate(&sized(99)).await.unwrap();
    s.generate(&sized(100)).await.unwrap();
    assert_eq!(s.generate(&sized(101)).await.unwrap_err(), too_long(100, 101, None));
}

#[tokio::test(start_paused = true)]
async fn the_completion_budget_counts_against_the_window() {
    let s = sim(SimConfig { context_window: 100, ..cfg(4, 3) });
    let mut r = sized(90);
    r.max_tokens = Some(10);
    s.generate(&r).await.unwrap();
    r.max_tokens = Some(11);
    assert_eq!(s.generate(&r).await.unwrap_err(), too_long(100, 90, Some(11)));
    // max_completion_tokens wins over max_tokens, both ways.
    r.max_completion_tokens = Some(10);
    s.generate(&r).await.unwrap();
    r.max_tokens = Some(1);
    r.max_completion_tokens = Some(11);
    assert_eq!(s.generate(&r).await.unwrap_err(), too_long(100, 90, Some(11)));
    // The largest budget the wire allows does not overflow the sum.
    r.max_completion_tokens = Some(u32::MAX);
    assert_eq!(s.generate(&r).await.unwrap_err(), too_long(100, 90, Some(u32::MAX)));
}

#[tokio::test(start_paused = true)]
async fn a_model_s_own_window_overrides_the_global_one() {
    let mut c = SimConfig { context_window: 100, ..cfg(4, 3) };
    c.models[0].context_window = Some(50);
    c.models.push(SimModel { context_window: Some(1000), ..SimModel::new("wide", "gpu0") });
    c.models.push(SimModel::new("plain", "gpu0"));
    let s = sim(c);
    assert_eq!(s.generate(&sized(51)).await.unwrap_err(), too_long(50, 51, None));
    let at = |model: &str, tokens| {
        let mut r = sized(tokens);
        r.model = model.into();
        r
    };
    s.generate(&at("wide", 1000)).await.unwrap();
    assert!(matches!(
        s.generate(&at("wide", 1001)).await,
        Err(SimError::ContextLengthExceeded { window: 1000, .. })
    ));
    s.generate(&at("plain", 100)).await.unwrap();
    assert!(matches!(
        s.generate(&at("plain", 101)).await,
        Err(SimError::ContextLengthExceeded { window: 100, .. })
    ));
    // Loaded at run time: the override applies, else the global window.
    s.load_model(SimModel {
        context_window: Some(10),
        memory_mb: 0,
        ..SimModel::new("tiny", "gpu0")
    })
    .unwrap();
    assert!(matches!(
        s.generate(&at("tiny", 11)).await,
        Err(SimError::ContextLengthExceeded { window: 10, .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn an_oversized_prompt_fails_at_once_without_a_slot_a_queue_place_or_a_request_number() {
    // One slot, busy, and no queue: anything admitted would be Overloaded. Prefill at the
    // default 200 µs a token would take minutes for this prompt.
    let s = sim(SimConfig { context_window: 512, max_queue: 0, ..cfg(1, 3) });
    let held = s.generate(&req("hold")).await.unwrap();
    let big = req(&"word ".repeat(680_000)); // 3.4 MB
    let t0 = Instant::now();
    assert_eq!(s.generate(&big).await.unwrap_err(), too_long(512, 680_004, None));
    assert_eq!(t0.elapsed(), Duration::ZERO);
    assert_eq!((s.in_flight(), s.queue_depth()), (1, 0));
    drop(held);
    // The refusal took no request number: the next request is number 1, as if it never was.
    assert_eq!(s.generate(&req("next")).await.unwrap().request_id(), 1);
    // A crash or refusal still wins: a dead backend does not read the prompt.
    s.set_faults(Faults { crash: true, ..Faults::default() }).unwrap();
    assert_eq!(s.generate(&big).await.unwrap_err(), SimError::Crashed);
}

#[tokio::test(start_paused = true)]
async fn error_rate_one_fails_every_request_after_its_ttft() {
    let mut c = cfg(1, 5);
    c.faults.error_rate = 1.0;
    let s = sim(c);
    for _ in 0..5 {
        let t0 = Instant::now();
        assert_eq!(s.generate(&req("a")).await.unwrap_err(), SimError::Injected);
        assert_eq!(t0.elapsed(), ms(41));
        assert_eq!(s.in_flight(), 0);
    }
}

#[tokio::test(start_paused = true)]
async fn error_rate_zero_never_fails_and_partial_rates_are_seeded() {
    let s = sim(SimConfig::zero_latency());
    for i in 0..50 {
        s.generate(&req(&i.to_string())).await.unwrap();
    }
    let pattern = |seed| async move {
        let s = sim(SimConfig { seed, ..faults(Faults { error_rate: 0.5, ..Faults::default() }) });
        let mut out = Vec::new();
        for _ in 0..40 {
            out.push(s.generate(&req("a")).await.is_ok());
        }
        out
    };
    let a = pattern(1).await;
    assert_eq!(a, pattern(1).await);
    assert_ne!(a, pattern(2).await);
    let ok = a.iter().filter(|x| **x).count();
    assert!((10..=30).contains(&ok), "{ok} of 40 succeeded at error_rate 0.5");
}

#[tokio::test(start_paused = true)]
async fn garbage_answers_are_well_formed_but_wrong_and_clear_at_run_time() {
    let s = sim(cfg(1, 8));
    let right = expected_answer(s.config(), &req("a"));
    s.set_faults(Faults { garbage_rate: 1.0, ..Faults::default() }).unwrap();
    let (g1, end) = drain(s.generate(&req("a")).await.unwrap()).await;
    let (g2, _) = drain(s.generate(&req("a")).await.unwrap()).await;
    assert!(matches!(end, Some(Ok(SimEvent::Finish { reason: FinishReason::Stop, .. }))));
    assert_eq!(g1.len(), right.len(), "same length, same timing");
    assert_ne!(g1, right);
    assert_ne!(g1, g2, "each garbage answer differs");
    s.set_faults(Faults::default()).unwrap();
    assert_eq!(drain(s.generate(&req("a")).await.unwrap()).await.0, right);
    // Partial rates are seeded like error_rate; out of range is refused.
    let pattern = |seed| async move {
        let s =
            sim(SimConfig { seed, ..faults(Faults { garbage_rate: 0.5, ..Faults::default() }) });
        let right = expected_answer(s.config(), &req("a"));
        let mut out = Vec::new();
        for _ in 0..40 {
            out.push(drain(s.generate(&req("a")).await.unwrap()).await.0 == right);
        }
        out
    };
    let a = pattern(1).await;
    assert_eq!(a, pattern(1).await);
    let ok = a.iter().filter(|x| **x).count();
    assert!((10..=30).contains(&ok), "{ok} of 40 right at garbage_rate 0.5");
    assert!(s.set_faults(Faults { garbage_rate: 1.5, ..Faults::default() }).is_err());
}

#[tokio::test(start_paused = true)]
async fn a_stall_goes_silent_until_dropped() {
    let mut c = cfg(1, 10);
    c.faults.stall_after_tokens = Some(3);
    let s = sim(c);
    let mut g = s.generate(&req("a")).await.unwrap();
    for _ in 0..3 {
        assert!(matches!(g.next().await, Some(Ok(SimEvent::Token(_)))));
    }
    assert!(timeout(Duration::from_secs(3600), g.next()).await.is_err());
    assert_eq!(s.in_flight(), 1);
    drop(g);
    assert_eq!(s.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_stall_at_zero_never_commits_and_short_answers_escape_stalls() {
    let mut c = cfg(1, 5);
    c.faults.stall_after_tokens = Some(0);
    let s = sim(c);
    assert!(timeout(Duration::from_secs(3600), s.generate(&req("a"))).await.is_err());
    assert_eq!(s.in_flight(), 0);

    let mut c = cfg(1, 5);
    c.faults.stall_after_tokens = Some(5);
    let s = sim(c);
    let (tokens, end) = drain(s.generate(&req("a")).await.unwrap()).await;
    assert_eq!(tokens.len(), 5);
    assert!(matches!(end, Some(Ok(SimEvent::Finish { .. }))));
}

#[tokio::test(start_paused = true)]
async fn a_cut_ends_the_stream_with_an_error_when_the_next_token_was_due() {
    let mut c = cfg(1, 10);
    c.faults.cut_after_tokens = Some(3);
    let s = sim(c);
    let t0 = Instant::now();
    let (tokens, end) = drain(s.generate(&req("a")).await.unwrap()).await;
    assert_eq!(tokens, expected_answer(s.config(), &req("a"))[..3]);
    assert_eq!(end, Some(Err(SimError::Cut { after: 3 })));
    // TTFT 41 ms, then tokens 2 and 3, then the fourth was due 20 ms later.
    assert_eq!(t0.elapsed(), ms(41 + 3 * 20));
    assert_eq!(s.in_flight(), 0);

    s.set_faults(Faults { cut_after_tokens: Some(0), ..Faults::default() }).unwrap();
    assert_eq!(s.generate(&req("a")).await.unwrap_err(), SimError::Cut { after: 0 });
    assert_eq!(s.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn slow_tokens_widen_every_gap_but_not_the_ttft() {
    let mut c = cfg(1, 4);
    c.faults.slow_token_ms = 100;
    let s = sim(c);
    let t0 = Instant::now();
    let g = s.generate(&req("a")).await.unwrap();
    assert_eq!(t0.elapsed(), ms(41));
    drain(g).await;
    assert_eq!(t0.elapsed(), ms(41 + 3 * 120));
}

#[tokio::test(start_paused = true)]
async fn refused_requests_fail_at_once_until_cleared() {
    let s = sim(faults(Faults { refuse_connections: true, ..Faults::default() }));
    let t0 = Instant::now();
    assert_eq!(s.generate(&req("a")).await.unwrap_err(), SimError::Refused);
    assert_eq!(t0.elapsed(), Duration::ZERO);
    assert!(s.faults().refuse_connections);
    s.set_faults(Faults::default()).unwrap();
    s.generate(&req("a")).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_crash_cuts_streams_and_queued_requests_at_once() {
    let s = sim(cfg(1, 10));
    let mut streaming = s.generate(&req("a")).await.unwrap();
    assert!(matches!(streaming.next().await, Some(Ok(SimEvent::Token(_)))));
    let queued = {
        let s = Arc::clone(&s);
        tokio::spawn(async move { s.generate(&req("b")).await.map(drop) })
    };
    tokio::time::sleep(ms(5)).await;
    assert_eq!((s.in_flight(), s.queue_depth()), (1, 1));

    s.set_faults(Faults { crash: true, ..Faults::default() }).unwrap();
    let t0 = Instant::now();
    assert_eq!(streaming.next().await, Some(Err(SimError::Crashed)));
    assert_eq!(streaming.next().await, None);
    assert_eq!(queued.await.unwrap(), Err(SimError::Crashed));
    assert_eq!(t0.elapsed(), Duration::ZERO);
    assert_eq!((s.in_flight(), s.queue_depth()), (0, 0));
    assert_eq!(s.generate(&req("c")).await.unwrap_err(), SimError::Crashed);

    s.set_faults(Faults::default()).unwrap();
    drain(s.generate(&req("c")).await.unwrap()).await;
}

#[tokio::test(start_paused = true)]
async fn a_crash_reaches_stalled_and_zero_latency_streams_even_if_cleared_before_they_look() {
    let s = sim(SimConfig::zero_latency());
    let mut fast = s.generate(&req("a")).await.unwrap();
    assert!(matches!(fast.next().await, Some(Ok(SimEvent::Token(_)))));
    s.set_faults(Faults { stall_after_tokens: Some(1), ..Faults::default() }).unwrap();
    let mut stalled = s.generate(&req("b")).await.unwrap();
    assert!(matches!(stalled.next().await, Some(Ok(SimEvent::Token(_)))));

    s.set_faults(Faults { crash: true, ..Faults::default() }).unwrap();
    s.set_faults(Faults::default()).unwrap();
    assert_eq!(fast.next().await, Some(Err(SimError::Crashed)));
    assert_eq!(stalled.next().await, Some(Err(SimError::Crashed)));
    assert_eq!(s.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn faults_are_validated() {
    let s = sim(SimConfig::default());
    let bad = Faults { error_rate: 1.5, ..Faults::default() };
    assert!(matches!(s.set_faults(bad), Err(ConfigError::OutOfRange { .. })));
    assert_eq!(s.faults(), Faults::default());
}

#[tokio::test(start_paused = true)]
async fn models_load_and_unload_with_memory_accounting() {
    let s = sim(SimConfig::zero_latency());
    assert_eq!(s.gpu_status()[0].memory_used_mb, 4096);
    let big = SimModel { memory_mb: 20_000, ..SimModel::new("big", "gpu0") };
    s.load_model(big.clone()).unwrap();
    let st = &s.gpu_status()[0];
    assert_eq!(
        (st.memory_used_mb, st.models.clone()),
        (24_096, vec!["sim-llama".into(), "big".into()])
    );
    assert!(matches!(s.load_model(big), Err(ConfigError::DuplicateModel(_))));
    let more = SimModel { memory_mb: 1000, ..SimModel::new("more", "gpu0") };
    assert!(matches!(s.load_model(more), Err(ConfigError::OutOfMemory { .. })));
    assert!(matches!(
        s.load_model(SimModel::new("x", "gpu7")),
        Err(ConfigError::UnknownGpu { .. })
    ));

    let mut r = req("a");
    r.model = "big".into();
    let g = s.generate(&r).await.unwrap();
    assert_eq!(g.model(), "big");
    assert!(s.unload_model("big"));
    assert!(!s.unload_model("big"));
    // Admitted work finishes; new work is refused.
    assert!(matches!(drain(g).await.1, Some(Ok(SimEvent::Finish { .. }))));
    assert_eq!(s.generate(&r).await.unwrap_err(), SimError::UnknownModel("big".into()));
    assert_eq!(s.models().len(), 1);
}

#[test]
fn gpu_status_converts_to_the_health_wire_type() {
    let s = Simulator::new(SimConfig::default()).unwrap();
    let h = GpuHealth::from(s.gpu_status().remove(0));
    assert_eq!((h.id.as_str(), h.slots, h.busy, h.utilization), ("gpu0", 4, 0, 0.0));
    assert_eq!(h.models, vec!["sim-llama".to_owned()]);
}
