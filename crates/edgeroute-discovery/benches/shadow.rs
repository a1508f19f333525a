//! What a shadow policy costs a decision (issue 15): `Compiled::decide` with the live policy
//! alone, and with a shadow policy deciding the same request beside it (its own compile of the
//! same snapshot, compared and counted). The 50-rule synthetic policy of `bench discover
//! --policy-rules 50` is live; the shadow is the same document whose matching rule ranks round
//! robin instead of latency first, so most comparisons differ (first node) and are kept as
//! examples (the slow path).
//!
//! `cargo bench -p edgeroute-discovery --bench shadow`

use arc_swap::ArcSwap;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use edgeroute_core::score::{Strategy, Weights};
use edgeroute_discovery::Snapshot;
use edgeroute_discovery::routing::{Jurisdictions, Routing, Source, Stamp};
use edgeroute_lab::synthetic;
use edgeroute_policy::{Claims, Policy, Request};

fn shadow(c: &mut Criterion) {
    let weights = Strategy::ALL.map(Weights::for_strategy);
    let live = synthetic::policy(50);
    // Round robin instead of latency first: most first nodes differ.
    let candidate = live.replace("cascade = [", "strategy = \"round_robin\"\ncascade = [");
    assert_ne!(live, candidate);
    let sessions: Vec<String> = (0..1024).map(|i| format!("session-{i}")).collect();
    let claims = Claims::default();
    let mut g = c.benchmark_group("decide");
    for n in [60usize, 1_000] {
        let snapshot =
            ArcSwap::from_pointee(Snapshot::build(synthetic::fleet(n, 7), weights, 1, 0));
        let j = Jurisdictions::default();
        let stamp = Stamp { modified: None, len: 0 };
        let routing = |with_shadow: bool| {
            let r = Routing::new(
                Source::File,
                None,
                1000,
                Some((Policy::parse(&live).expect("the bench policy parses"), stamp)),
                snapshot.load_full(),
                &j,
                0,
            )
            .expect("the runtime builds");
            if !with_shadow {
                return r;
            }
            let r = r.with_shadow("candidate.toml".into(), 8);
            r.offer_shadow(Ok(candidate.clone()), None, &snapshot, &j);
            r
        };
        for (name, with_shadow) in [("live", false), ("live_and_shadow", true)] {
            let r = routing(with_shadow);
            let compiled = r.compiled();
            let mut i = 0usize;
            g.bench_function(BenchmarkId::new(name, n), |b| {
                b.iter(|| {
                    i = (i + 1) % sessions.len();
                    let mut req = Request::new(&claims, synthetic::MODELS[0]);
                    req.session = Some(&sessions[i]);
                    compiled.decide(&req, false)
                })
            });
            if let Some(rep) = r.shadow_report() {
                assert!(rep.compared > 0 && rep.differed > 0, "{rep:?}");
            }
        }
    }
    g.finish();
}

criterion_group!(benches, shadow);
criterion_main!(benches);
