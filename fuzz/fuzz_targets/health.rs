//! A node's `GET /health` answer ([`NodeHealth`] JSON) as discovery's probe receives it, folded
//! into discovery's registry ([`Fleet::probe_ok`]) and turned into the node's ranking view.
//!
//! Input: the response body.
//!
//! Properties: nothing panics (whatever numbers a node reports: negative, huge, NaN-free
//! JSON); a report that parsed re-encodes to JSON that parses back to the same report; the
//! registry keeps exactly the one node and reports it under its configured id.

#![no_main]

use std::time::Duration;

use edgeroute_core::health::HealthParams;
use edgeroute_discovery::config::StaticNode;
use edgeroute_discovery::fleet::{Fleet, ViewParams};
use edgeroute_proto::health::NodeHealth;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(health) = serde_json::from_slice::<NodeHealth>(data) else { return };
    let json = serde_json::to_vec(&health).expect("a parsed report encodes");
    let again: NodeHealth = serde_json::from_slice(&json).expect("a re-encoded report parses");
    assert_eq!(again.node_id, health.node_id);
    assert_eq!(again.models, health.models);
    assert_eq!(again.status, health.status);

    let mut fleet = Fleet::new(HealthParams::default(), Duration::from_secs(60));
    let node = StaticNode {
        id: "n1".into(),
        url: "http://127.0.0.1:9".into(),
        region: "r1".into(),
        cost_per_1k: None,
        jurisdiction: None,
    };
    fleet.add_static(&node, Duration::ZERO);
    let params = ViewParams { unknown_ttft_ms: 250.0, min_ttft_samples: 5 };
    for i in 1..=3u64 {
        let now = Duration::from_secs(i);
        fleet.probe_ok("n1", now - Duration::from_millis(10), now, health.clone());
        let entries = fleet.entries(now, params);
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].info.id, "n1");
    }
    fleet.probe_failed("n1", Duration::from_secs(4), "refused".into());
    let entries = fleet.entries(Duration::from_secs(30), params);
    assert_eq!(entries.len(), 1);
});
