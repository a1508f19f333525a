//! A decision against a 50-rule policy and 1,000 candidate nodes, with and without explain.
//! The request matches the 50th rule (every rule before it is tried), which splits versions,
//! bounds TTFT p99 and GPU, restricts jurisdictions and falls back to a cloud pool.
#![allow(clippy::unwrap_used)]

use std::fmt::Write;
use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use edgeroute_policy::*;

const REGIONS: [&str; 10] = ["fra", "ams", "par", "mad", "nyc", "sfo", "chi", "tor", "tok", "syd"];

fn policy_text() -> String {
    let mut t = String::from(
        "version = \"bench\"\n[jurisdictions]\neu = [\"fra\", \"ams\", \"par\", \"mad\"]\nus = [\"nyc\", \"sfo\", \"chi\"]\nca = [\"tor\"]\n",
    );
    for m in 0..10 {
        writeln!(t, "[[models]]\nname = \"model-{m}\"\n[[models.versions]]\nid = \"v1\"\n[[models.versions]]\nid = \"v2\"").unwrap();
    }
    writeln!(t, "[[pools]]\nname = \"eu-cloud\"\ntier = \"cloud\"\nendpoint = \"https://eu\"\nregion = \"fra\"\nserves = {{ model-0 = \"v1\" }}\nprice_in_per_1k = 0.5\nprice_out_per_1k = 1.5").unwrap();
    for r in 0..49 {
        writeln!(
            t,
            "[[rules]]\nid = \"rule-{r}\"\nmatch.tenants = [\"tenant-{r}\"]\nmatch.models = [\"model-{}\"]\nconstraints.below = {{ ttft_p99_ms = 80 }}",
            r % 10
        )
        .unwrap();
    }
    t.push_str(
        "[[rules]]\nid = \"eu-canary\"\nmatch.models = [\"model-0\"]\nversions = { v1 = 95, v2 = 5 }\n\
         tiers = [\"edge\", \"eu-cloud\"]\n\
         constraints.jurisdictions = [\"eu\"]\nconstraints.below = { ttft_p99_ms = 50, gpu_util = 0.8 }\n",
    );
    t
}

fn fleet(p: &Policy) -> Fleet {
    let nodes = (0..1000u32)
        .map(|i| {
            let mut n = NodeFacts::new(format!("node-{i:04}"), REGIONS[(i % 10) as usize]);
            for m in [i % 10, (i / 10) % 10, 0] {
                n.models
                    .push(Served::new(format!("model-{m}"), if i % 7 == 0 { "v2" } else { "v1" }));
            }
            n.ttft_p50_ms = f64::from(10 + i % 40);
            n.ttft_p99_ms = f64::from(20 + i % 60);
            n.queue = i % 5;
            n.in_flight = i % 9;
            n.capacity = 8;
            n.gpu_util = f64::from(i % 100) / 100.0;
            n.error_rate = f64::from(i % 3) / 100.0;
            n
        })
        .collect();
    Fleet::new(p, nodes)
}

fn bench(c: &mut Criterion) {
    let p = Policy::parse(&policy_text()).unwrap();
    assert_eq!(p.rule_ids().len(), 50);
    let f = fleet(&p);
    let claims =
        Claims { sub: "acme".into(), jurisdictions: Some(vec!["eu".into()]), ..Claims::default() };
    let rtt: Vec<(String, f64)> = REGIONS.iter().map(|r| ((*r).to_owned(), 12.0)).collect();
    let mut req = Request::new(&claims, "model-0");
    req.session = Some("session-42");
    req.client_region = Some("fra");
    req.rtt_ms = &rtt;
    let mut st = p.new_state();
    let d = p.decide(&req, &f, &mut st, true);
    assert_eq!(d.outcome, Outcome::Routed);
    assert_eq!(d.rule.as_deref(), Some("eu-canary"));
    assert_eq!(d.explain.as_ref().unwrap().attempts[0].candidates, 1000);
    c.bench_function("decide/50 rules, 1000 nodes", |b| {
        b.iter(|| black_box(p.decide(black_box(&req), &f, &mut st, false)))
    });
    c.bench_function("decide/50 rules, 1000 nodes, explain", |b| {
        b.iter(|| black_box(p.decide(black_box(&req), &f, &mut st, true)))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
