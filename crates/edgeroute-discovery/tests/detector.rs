//! The failure detector with its documented defaults, on a paused clock: a probe seam stands in
//! for the network, so every time below is exact and the test is deterministic.
//!
//! Defaults: probes every 1 s, φ threshold 8, deviation floor 100 ms, readmission after 3
//! consecutive good probes. A node whose probes stop is ejected when φ crosses 8, about
//! 1 s + 5.2 × 100 ms ≈ 1.52 s after its last answered probe (so 1.5–2.5 s after it died,
//! depending on where in the probe cycle it died), plus at most a quarter interval until the
//! next re-evaluation. A recovered node rejoins on its third consecutive good probe, 2 s after
//! the first.
#![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgeroute_core::score::{Query, Strategy};
use edgeroute_discovery::probe::{Probe, ProbeError, ProbeFuture};
use edgeroute_discovery::{Discovery, DiscoveryConfig};
use tokio::time::Instant;

#[derive(Debug, Default)]
struct FakeNode {
    alive: AtomicBool,
    answered: Mutex<Vec<Instant>>,
}

impl Probe for FakeNode {
    fn probe(&self, _uri: http::Uri) -> ProbeFuture {
        let alive = self.alive.load(Ordering::SeqCst);
        if alive {
            self.answered.lock().unwrap().push(Instant::now());
        }
        Box::pin(async move {
            if !alive {
                return Err(ProbeError::Connect("connection refused".into()));
            }
            Ok(edgeroute_lab::synthetic::health("a", "toronto", &["llm"]))
        })
    }
}

fn listed(d: &Discovery) -> bool {
    let q = Query { model: "llm".into(), pipeline: None, allowed_regions: vec![], k: 1 };
    !d.snapshot().top_k(&q, Strategy::LatencyFirst).is_empty()
}

/// Advances the paused clock in 10 ms steps until `pred` holds; returns when it first held.
async fn when(d: &Discovery, want: bool, limit: Duration) -> Instant {
    let t = Instant::now();
    while listed(d) != want {
        assert!(t.elapsed() < limit, "still {} after {limit:?}", !want);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Instant::now()
}

#[tokio::test(start_paused = true)]
async fn defaults_eject_a_silent_node_in_about_one_and_a_half_seconds_and_readmit_after_three_probes()
 {
    let toml = "[discovery]\nallow_unauthenticated = true\n[[nodes]]\nid = \"a\"\nurl = \"http://10.0.0.1:8080\"\nregion = \"toronto\"\n";
    let node = Arc::new(FakeNode::default());
    node.alive.store(true, Ordering::SeqCst);
    let d = Discovery::build(DiscoveryConfig::from_toml(toml, |_| None).unwrap())
        .unwrap()
        .with_probe(node.clone());
    let running = d.start().await.unwrap();
    when(&d, true, Duration::from_secs(3)).await;
    // A minute of steady probes.
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(listed(&d));

    // Dies half-way through a probe cycle.
    tokio::time::sleep(Duration::from_millis(500)).await;
    node.alive.store(false, Ordering::SeqCst);
    let last_ok = *node.answered.lock().unwrap().last().unwrap();
    let ejected = when(&d, false, Duration::from_secs(5)).await;
    let after_last = ejected - last_ok;
    assert!(
        (Duration::from_millis(1500)..=Duration::from_millis(1800)).contains(&after_last),
        "ejected {after_last:?} after the last answered probe"
    );
    let reason = d.snapshot().infos().next().unwrap().health_reason.clone().unwrap();
    assert!(reason.contains("phi above 8"), "{reason}");

    // Back: stays out until the third consecutive good probe.
    node.alive.store(true, Ordering::SeqCst);
    let revived = Instant::now();
    let back = when(&d, true, Duration::from_secs(5)).await;
    let answers: Vec<Instant> =
        node.answered.lock().unwrap().iter().copied().filter(|t| *t >= revived).collect();
    assert!(answers.len() >= 3, "readmitted after {} good probe(s)", answers.len());
    let after_first = back - answers[0];
    assert!(
        (Duration::from_millis(2000)..=Duration::from_millis(2300)).contains(&after_first),
        "readmitted {after_first:?} after the first good probe"
    );
    running.stop().await;
}
