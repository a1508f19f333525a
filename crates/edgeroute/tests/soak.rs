//! A short soak of the real `edgeroute node` binary (the lab's `bench soak`): the
//! well-behaved tenant sees no error while hostile requests get their precise refusals, and
//! the node's descriptors come back to where they were.
#![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

use std::time::Duration;

use edgeroute_lab::soak::{self, Hostile, SoakOpts};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_cost_the_well_behaved_tenant_nothing() {
    let mut opts = SoakOpts::new(env!("CARGO_BIN_EXE_edgeroute"));
    opts.duration = Duration::from_secs(5);
    opts.rate = 60.0;
    opts.hostile_rate = 20.0;
    opts.body_timeout = Duration::from_millis(800);
    opts.command = "cargo test -p edgeroute --test soak".into();
    let report = soak::run(opts).await.unwrap();
    let md = report.to_markdown();
    assert_eq!(report.legit_errors(), 0, "{md}");
    assert!(report.json.ok >= 140 && report.stream.ok >= 140, "{md}");
    assert_eq!(report.hostile_unexpected(), 0, "{md}");
    for kind in Hostile::ALL {
        assert!(report.hostile.get(&kind).is_some_and(|s| s.values().sum::<u64>() > 5), "{md}");
    }
    for reason in ["body_timeout", "body_too_large", "unauthenticated", "backend_rejected"] {
        assert!(report.rejected.iter().any(|l| l.contains(reason)), "{reason}: {md}");
    }
    let (_, late, max) = report.fds().unwrap();
    assert!(max < 400 && late < 300, "descriptors: {md}");
}
