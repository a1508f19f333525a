//! The routing comparison, small and on tokio's paused clock: the real gateways, discovery
//! replicas and SDK on the in-memory network, with no real waiting. These assert behaviour
//! (who fails, who finds the fast path); the figures are `edgeroute bench fleet`'s.
#![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

use std::time::Duration;

use edgeroute_lab::compare::report::Row;
use edgeroute_lab::compare::world::node_index;
use edgeroute_lab::compare::{CompareOpts, Run, Scenario, Strategy, TurnRecord, run_one};

fn opts() -> CompareOpts {
    CompareOpts {
        seed: 5,
        duration: Duration::from_secs(10),
        sessions_per_s: 3.0,
        turns: 4,
        ..CompareOpts::default()
    }
}

#[tokio::test(start_paused = true)]
async fn a_node_death_costs_edgeroute_no_request_and_dns_some() {
    let opts = opts();
    let death = opts.death_at(Scenario::NodeDeath).unwrap();
    let e = run_one(&opts, Scenario::NodeDeath, Strategy::Edgeroute).await.unwrap();
    let row = Row::new(Scenario::NodeDeath, Strategy::Edgeroute, &e);
    assert!(row.turns >= 80, "{} turns", row.turns);
    assert_eq!((row.failed_requests, row.lost_turns), (0, 0), "{row:?}");
    assert!(row.longest_silence_ms < 1000.0, "{row:?}");
    let victim = e.victim.expect("a node died");
    let served = |run: &Run, after: bool| {
        run.records.iter().filter(|r| r.node == Some(victim) && (r.start >= death) == after).count()
    };
    assert!(served(&e, false) > 0, "the victim served before it died");
    assert_eq!(served(&e, true), 0, "and nothing that started after");

    // DNS keeps sending callers to the dead node until its checks and the TTL catch up.
    let d = run_one(&opts, Scenario::NodeDeath, Strategy::Dns).await.unwrap();
    let row = Row::new(Scenario::NodeDeath, Strategy::Dns, &d);
    assert!(row.failed_requests > 0, "{row:?}");
    assert!(row.longest_silence_ms >= 1000.0, "{row:?}");
}

#[tokio::test(start_paused = true)]
async fn a_model_unloaded_on_the_busiest_node_costs_edgeroute_no_turn() {
    let opts = opts();
    let at = opts.death_at(Scenario::ModelUnload).unwrap();
    let e = run_one(&opts, Scenario::ModelUnload, Strategy::Edgeroute).await.unwrap();
    let row = Row::new(Scenario::ModelUnload, Strategy::Edgeroute, &e);
    assert_eq!((row.failed_requests, row.lost_turns), (0, 0), "{row:?}");
    let victim = e.victim.expect("a node unloaded the model");
    let later = e
        .records
        .iter()
        .filter(|r| r.node == Some(victim) && r.start >= at + Duration::from_secs(1))
        .count();
    assert_eq!(later, 0, "no turn starts on the node without the model a second after");
}

fn share_on(run: &Run, site: &str, node: &str) -> f64 {
    let of_site: Vec<&TurnRecord> = run.records.iter().filter(|r| r.site == site && r.ok).collect();
    let on = of_site.iter().filter(|r| r.node == node_index(node)).count();
    on as f64 / of_site.len().max(1) as f64
}

#[tokio::test(start_paused = true)]
async fn on_a_congested_isp_edgeroute_finds_the_fast_path_and_dns_does_not() {
    let opts = opts();
    let e = run_one(&opts, Scenario::CongestedIsp, Strategy::Edgeroute).await.unwrap();
    let d = run_one(&opts, Scenario::CongestedIsp, Strategy::Dns).await.unwrap();
    let o = run_one(&opts, Scenario::CongestedIsp, Strategy::Oracle).await.unwrap();
    // mtl-1 (9 ms + 25 ms) beats tor-1 (53 ms + 15 ms) from the congested ISP.
    assert!(share_on(&o, "toronto-congested", "mtl-1") > 0.8);
    assert!(share_on(&e, "toronto-congested", "mtl-1") > 0.8);
    let on_montreal =
        share_on(&d, "toronto-congested", "mtl-1") + share_on(&d, "toronto-congested", "mtl-2");
    assert_eq!(on_montreal, 0.0, "the resolver is in Toronto");
    // The congested callers' typical turn: Montreal's fast node instead of a congested path.
    let median = |r: &Run| {
        let v: Vec<f64> = r
            .records
            .iter()
            .filter(|t| t.site == "toronto-congested")
            .filter_map(|t| t.ttft_ms)
            .collect();
        edgeroute_lab::compare::report::quantile(&v, 0.5)
    };
    assert!(median(&e) < median(&d) - 20.0, "{} vs {}", median(&e), median(&d));
    assert!(median(&e) <= median(&o) + 5.0, "{} vs {}", median(&e), median(&o));
}

#[tokio::test(start_paused = true)]
async fn a_client_that_knows_only_the_zone_name_routes_as_well_as_a_hand_configured_one() {
    let opts = opts();
    let e = run_one(&opts, Scenario::CongestedIsp, Strategy::Edgeroute).await.unwrap();
    let d = run_one(&opts, Scenario::CongestedIsp, Strategy::EdgerouteDns).await.unwrap();
    // GeoDNS places the congested ISP in Toronto; the SDK's probes still find Montreal.
    assert!(share_on(&d, "toronto-congested", "mtl-1") > 0.8);
    let (re, rd) = (
        Row::new(Scenario::CongestedIsp, Strategy::Edgeroute, &e),
        Row::new(Scenario::CongestedIsp, Strategy::EdgerouteDns, &d),
    );
    assert_eq!(rd.failed_requests, 0);
    assert!(
        rd.ttft_p99_ms <= re.ttft_p99_ms * 1.05,
        "DNS bootstrap p99 {:.1} ms, hand-configured {:.1} ms",
        rd.ttft_p99_ms,
        re.ttft_p99_ms
    );
}

#[tokio::test(start_paused = true)]
async fn every_request_through_the_central_proxy_pays_its_detour() {
    let opts = CompareOpts { duration: Duration::from_secs(4), ..opts() };
    let c = run_one(&opts, Scenario::Steady, Strategy::Central).await.unwrap();
    let o = run_one(&opts, Scenario::Steady, Strategy::Oracle).await.unwrap();
    let row = Row::new(Scenario::Steady, Strategy::Central, &c);
    assert_eq!(row.failed_requests, 0);
    // Vancouver callers cross to Toronto and back before reaching any node: served in
    // Vancouver, that is two crossings instead of none.
    let van = |local: bool| -> Vec<f64> {
        c.records
            .iter()
            .filter(|r| r.site == "vancouver")
            .filter(|r| r.node.is_some_and(|n| (n < 2) == local))
            .filter_map(|r| r.overhead_ms)
            .collect()
    };
    assert!(!van(true).is_empty() && van(true).iter().all(|o| *o >= 100.0), "{:?}", van(true));
    assert!(van(false).iter().all(|o| *o >= 0.0 && *o < 10.0), "{:?}", van(false));
    let oracle = Row::new(Scenario::Steady, Strategy::Oracle, &o);
    assert!(oracle.overhead_mean_ms.abs() < 2.0, "the oracle routes for free: {oracle:?}");
}
