//! The rollout machine driven by a simulated fleet: a good version everywhere, a bad one caught
//! in the first wave, and any sequence of reports (property tests) keeping the invariants.
#![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

use std::collections::VecDeque;

use edgeroute_rollout::{Action, Input, Phase, Plan, Rollout, VersionStats};
use proptest::prelude::*;

const PLAN: &str = r#"
model = "llama"
from = "v1"
to = "v2"
waves = [["tor"], ["mtl"], ["van", "sea"]]
[gates]
soak_s = 60
min_requests = 100
[load.v2]
path = "/models/llama-v2"
"#;

/// A fleet that performs every action at once and reports figures every 10 s: the new
/// version's error rate `new_errors` per mille, correctness failures when `wrong`.
struct Fleet {
    now_ms: u64,
    pending: VecDeque<Input>,
    new_errors: u64,
    wrong: bool,
    /// Requests answered per version, per region: (old, new), for "no request failed".
    unloaded: Vec<(String, String)>,
}

impl Fleet {
    fn perform(&mut self, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Load { region, .. } => {
                    self.pending.push_back(Input::Loaded { region, result: Ok(()) });
                }
                Action::Weights { region, weights } => {
                    assert_eq!(weights.iter().map(|(_, w)| u32::from(*w)).sum::<u32>(), 100);
                    self.pending.push_back(Input::WeightsApplied { region });
                }
                Action::Unload { region, version } => {
                    self.unloaded.push((region.clone(), version));
                    self.pending.push_back(Input::Unloaded { region });
                }
            }
        }
    }

    fn run(&mut self, r: &mut Rollout) {
        let first = r.start(self.now_ms);
        self.perform(first);
        let mut since_figures = 0;
        while !r.is_over() && self.now_ms < 3_600_000 {
            while let Some(input) = self.pending.pop_front() {
                let out = r.handle(input, self.now_ms);
                self.perform(out);
            }
            self.now_ms += 1000;
            since_figures += 1;
            let out = r.tick(self.now_ms);
            self.perform(out);
            if since_figures >= 10 {
                since_figures = 0;
                if let Phase::Soaking { since_ms, .. } = r.phase() {
                    let secs = (self.now_ms - since_ms) / 1000;
                    let n = secs * 5; // 5 requests/s on the new version
                    let old = VersionStats {
                        requests: secs * 50,
                        errors: secs / 20,
                        ttft_p99_ms: Some(100.0),
                        correctness_failures: 0,
                    };
                    let new = VersionStats {
                        requests: n,
                        errors: n * self.new_errors / 1000,
                        ttft_p99_ms: Some(102.0),
                        correctness_failures: u64::from(self.wrong && n > 0),
                    };
                    for region in r.plan().waves[r.wave()].clone() {
                        self.pending.push_back(Input::Figures { region, old, new });
                    }
                }
            }
        }
    }
}

fn fleet(new_errors: u64, wrong: bool) -> Fleet {
    Fleet { now_ms: 0, pending: VecDeque::new(), new_errors, wrong, unloaded: vec![] }
}

#[test]
fn a_good_version_reaches_every_region_wave_by_wave_and_the_old_one_goes_last() {
    let mut r = Rollout::new(Plan::from_toml(PLAN).unwrap());
    let mut f = fleet(1, false);
    f.run(&mut r);
    assert_eq!(r.phase(), &Phase::Finished, "{:#?}", r.log());
    assert!(r.new_share().values().all(|s| *s == 100));
    // v1 unloaded everywhere, and only at the end; v2 never.
    assert_eq!(f.unloaded.len(), 4);
    assert!(f.unloaded.iter().all(|(_, v)| v == "v1"));
    let log: Vec<&str> = r.log().iter().map(|e| e.text.as_str()).collect();
    let validated = log.iter().position(|l| l.contains("validated")).unwrap();
    let mtl = log.iter().position(|l| l.starts_with("wave 2")).unwrap();
    assert!(validated < mtl, "{log:#?}");
    eprintln!("{log:#?}");
}

#[test]
fn a_version_that_fails_its_correctness_probes_is_rolled_back_after_the_first_region() {
    let mut r = Rollout::new(Plan::from_toml(PLAN).unwrap());
    let mut f = fleet(0, true);
    f.run(&mut r);
    let Phase::RolledBack { reason } = r.phase() else { panic!("{:?}", r.phase()) };
    assert!(reason.contains("tor") && reason.contains("correctness"), "{reason}");
    assert!(!r.validated());
    assert!(r.new_share().values().all(|s| *s == 0), "{:?}", r.new_share());
    assert_eq!(f.unloaded, [("tor".to_owned(), "v2".to_owned())]);
    let log: Vec<&str> = r.log().iter().map(|e| e.text.as_str()).collect();
    assert!(log.iter().all(|l| !l.starts_with("wave 2")), "{log:#?}");
    assert!(log.last().unwrap().contains("every region on v1"), "{log:#?}");
}

#[test]
fn an_error_rate_above_the_old_versions_fails_the_step_before_its_soak_ends() {
    let mut r = Rollout::new(Plan::from_toml(PLAN).unwrap());
    let mut f = fleet(80, false); // 8 % against 0.1 %
    f.run(&mut r);
    let Phase::RolledBack { reason } = r.phase() else { panic!("{:?}", r.phase()) };
    assert!(reason.contains("error rate"), "{reason}");
    assert!(f.now_ms < 60_000 + 30_000, "failed at {} ms", f.now_ms);
}

#[test]
fn the_state_survives_a_restart_of_the_driver() {
    let mut r = Rollout::new(Plan::from_toml(PLAN).unwrap());
    let out = r.start(0);
    assert_eq!(out.len(), 1);
    let saved = serde_json::to_string(&r).unwrap();
    let mut back: Rollout = serde_json::from_str(&saved).unwrap();
    assert_eq!(back, r);
    let out = back.handle(Input::Loaded { region: "tor".into(), result: Ok(()) }, 1000);
    assert!(
        matches!(&out[..], [Action::Weights { region, weights }] if region == "tor" && weights == &[("v1".to_owned(), 95), ("v2".to_owned(), 5)])
    );
}

#[test]
fn a_failed_load_or_a_stuck_step_rolls_the_wave_back() {
    let mut r = Rollout::new(Plan::from_toml(PLAN).unwrap());
    r.start(0);
    let out =
        r.handle(Input::Loaded { region: "tor".into(), result: Err("out of memory".into()) }, 5);
    assert!(
        matches!(&out[..], [Action::Weights { weights, .. }] if weights == &[("v1".to_owned(), 100)])
    );
    assert!(
        matches!(r.phase(), Phase::RollingBack { reason, .. } if reason.contains("out of memory"))
    );
    // A load that never finishes.
    let mut r = Rollout::new(Plan::from_toml(PLAN).unwrap());
    r.start(0);
    assert!(r.tick(600_000).is_empty());
    assert!(!r.tick(600_001).is_empty());
    assert!(
        matches!(r.phase(), Phase::RollingBack { reason, .. } if reason.contains("took over 600 s"))
    );
}

#[derive(Debug, Clone)]
enum Step {
    Ack(usize),
    Figures { region: usize, new_requests: u64, new_errors: u64, wrong: bool },
    Tick(u64),
    Abort,
    LoadFails(usize),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0usize..4).prop_map(Step::Ack),
        4 => (0usize..4, 0u64..400, 0u64..40, prop::bool::weighted(0.05))
            .prop_map(|(region, new_requests, new_errors, wrong)| Step::Figures { region, new_requests, new_errors, wrong }),
        3 => (0u64..120_000).prop_map(Step::Tick),
        1 => Just(Step::Abort),
        1 => (0usize..4).prop_map(Step::LoadFails),
    ]
}

const REGIONS: [&str; 4] = ["tor", "mtl", "van", "sea"];

proptest! {
    /// Whatever the fleet reports, in any order: nothing outside the first wave gets the new
    /// version before validation; shares only follow the plan's steps; a rollback leaves the
    /// failing wave at 0 %; the old version is unloaded only at the very end.
    #[test]
    fn invariants(steps in proptest::collection::vec(step(), 1..300)) {
        let plan = Plan::from_toml(PLAN).unwrap();
        let mut r = Rollout::new(plan.clone());
        let mut now = 0u64;
        let mut actions = r.start(now);
        let mut last_share: std::collections::BTreeMap<String, u8> = Default::default();
        for s in steps {
            for a in &actions {
                match a {
                    Action::Weights { region, weights } => {
                        let share = weights.iter().find(|(v, _)| v == "v2").map_or(0, |(_, w)| *w);
                        prop_assert!(share == 0 || plan.steps.contains(&share));
                        let before = last_share.get(region).copied().unwrap_or(0);
                        prop_assert!(share == 0 || share >= before, "{region}: {before} → {share}");
                        last_share.insert(region.clone(), share);
                    }
                    Action::Unload { version, .. } if version == "v1" => {
                        let at_the_end = matches!(r.phase(), Phase::Finishing { .. } | Phase::Finished);
                        prop_assert!(at_the_end, "v1 unloaded in {:?}", r.phase());
                    }
                    _ => {}
                }
            }
            if !r.validated() {
                for region in plan.regions().filter(|x| !plan.waves[0].iter().any(|w| w == x)) {
                    prop_assert_eq!(r.new_share().get(region).copied().unwrap_or(0), 0, "{} before validation", region);
                }
            }
            let input = match s {
                Step::Ack(i) => match r.phase() {
                    Phase::Loading { .. } => Input::Loaded { region: REGIONS[i].into(), result: Ok(()) },
                    Phase::Applying { .. } => Input::WeightsApplied { region: REGIONS[i].into() },
                    Phase::RollingBack { weights_waiting, .. } if weights_waiting.contains(REGIONS[i]) => Input::WeightsApplied { region: REGIONS[i].into() },
                    _ => Input::Unloaded { region: REGIONS[i].into() },
                },
                Step::Figures { region, new_requests, new_errors, wrong } => Input::Figures {
                    region: REGIONS[region].into(),
                    old: VersionStats { requests: 10_000, errors: 10, ttft_p99_ms: Some(100.0), correctness_failures: 0 },
                    new: VersionStats { requests: new_requests, errors: new_errors.min(new_requests), ttft_p99_ms: Some(100.0), correctness_failures: u64::from(wrong) },
                },
                Step::Tick(ms) => { now += ms; actions = r.tick(now); continue; }
                Step::Abort => Input::Abort { reason: "operator".into() },
                Step::LoadFails(i) => Input::Loaded { region: REGIONS[i].into(), result: Err("no GPU".into()) },
            };
            actions = r.handle(input, now);
            if let Phase::RollingBack { .. } | Phase::RolledBack { .. } = r.phase() {
                for region in &plan.waves[r.wave().min(plan.waves.len() - 1)] {
                    prop_assert_eq!(r.new_share()[region], 0);
                }
            }
        }
    }
}
