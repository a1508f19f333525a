//! Re-scoring after a change: building the ranked snapshot of a whole fleet.
//!
//! `cargo bench -p edgeroute-discovery --bench rescore`

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use edgeroute_core::score::{Query, Strategy, Weights};
use edgeroute_discovery::Snapshot;
use edgeroute_lab::synthetic;

fn rescore(c: &mut Criterion) {
    let weights = Strategy::ALL.map(Weights::for_strategy);
    let mut g = c.benchmark_group("rescore");
    g.sample_size(20);
    for n in [60usize, 1_000, 10_000] {
        let entries = synthetic::fleet(n, 7);
        g.bench_with_input(BenchmarkId::new("snapshot_build", n), &entries, |b, e| {
            b.iter_batched(
                || e.clone(),
                |e| Snapshot::build(e, weights, 1, 0),
                criterion::BatchSize::LargeInput,
            )
        });
    }
    // The whole path after one node's telemetry changed: the registry rebuilds that node's
    // entry (reusing the others), then the snapshot ranks the fleet.
    for n in [1_000usize, 10_000] {
        let (mut fleet, now) = synthetic::registry(n, 7);
        let entries = synthetic::fleet(n, 7);
        let changed = entries[n / 2].clone();
        let mut report = synthetic::report(&changed);
        let _ = fleet.entries(now, synthetic::VIEW_PARAMS);
        let mut t = now;
        g.bench_function(BenchmarkId::new("after_one_change", n), |b| {
            b.iter(|| {
                t += std::time::Duration::from_millis(1);
                report.queue_depth = (report.queue_depth + 1) % 10;
                fleet.probe_ok(&changed.view.id, t, t, report.clone());
                let e = fleet.entries(t, synthetic::VIEW_PARAMS);
                Snapshot::build(e, weights, 1, 0)
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("lookup");
    for n in [60usize, 1_000, 10_000] {
        let snap = Snapshot::build(synthetic::fleet(n, 7), weights, 1, 0);
        let any =
            Query { model: "llama-3.1-8b".into(), pipeline: None, allowed_regions: vec![], k: 3 };
        let two =
            Query { allowed_regions: vec!["toronto".into(), "montreal".into()], ..any.clone() };
        g.bench_with_input(BenchmarkId::new("top3_any_region", n), &snap, |b, s| {
            b.iter(|| s.top_k(&any, Strategy::LatencyFirst))
        });
        g.bench_with_input(BenchmarkId::new("top3_two_regions", n), &snap, |b, s| {
            b.iter(|| s.top_k(&two, Strategy::LatencyFirst))
        });
    }
    g.finish();
}

criterion_group!(benches, rescore);
criterion_main!(benches);
