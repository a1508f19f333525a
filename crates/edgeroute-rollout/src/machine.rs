//! The rollout as a state machine (quinn-proto's shape): inputs and `now_ms` in, actions out,
//! no I/O. A driver performs the actions (node admin API loads and unloads, policy pushes on
//! the bus) and feeds back their results and each region's figures; the machine's state is
//! plain data (serde), so the driver can keep it on the bus and resume after a restart.
//!
//! Per wave (its regions together): load the new version beside the old on
//! `nodes_per_region` nodes → for each step, set the region's version weights (old 100 − s,
//! new s), wait for them to apply, then soak and judge ([`crate::gate`]) → after the last step,
//! the next wave. The first wave validates the new version: no other region is given any of
//! it before that wave's last step has passed. The old version stays loaded everywhere until
//! every wave is done (so a later failure can still roll back), then it is unloaded.
//!
//! A failed gate (or a failed load, or a timeout, or an operator's abort) rolls back the
//! current wave: its weights go back to the old version first, then the new version is
//! unloaded through the drain path (sessions move between turns: no request fails). Waves that
//! had already passed stay on the new version only when the failure comes after validation;
//! the rollout then ends `Halted`, saying which regions run which version.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::gate::{Verdict, VersionStats, judge};
use crate::plan::Plan;

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Action {
    /// Load `version` of the plan's model on `nodes` nodes of `region` (beside what they serve).
    Load { region: String, version: String, nodes: u32 },
    /// Set the version weights the policy gives clients of `region` (percent, summing to 100).
    Weights { region: String, weights: Vec<(String, u8)> },
    /// Unload `version` in `region` through the drain path.
    Unload { region: String, version: String },
}

/// What the driver reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Input {
    /// A `Load` finished (`Err`: why it failed).
    Loaded { region: String, result: Result<(), String> },
    /// A `Weights` is in force (every discovery replica acknowledged the policy).
    WeightsApplied { region: String },
    /// An `Unload` finished.
    Unloaded { region: String },
    /// Both versions' figures in `region` since the current step began.
    Figures { region: String, old: VersionStats, new: VersionStats },
    /// The operator stops the rollout: roll back the current wave.
    Abort { reason: String },
}

/// Where the rollout is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Phase {
    /// Not started.
    Ready,
    /// Loading the new version in the wave's regions; `waiting`: not loaded yet.
    Loading { since_ms: u64, waiting: BTreeSet<String> },
    /// Applying step `step`'s weights.
    Applying { step: usize, since_ms: u64, waiting: BTreeSet<String> },
    /// Step `step` in force since `since_ms`, judged on each region's figures.
    Soaking { step: usize, since_ms: u64, figures: BTreeMap<String, (VersionStats, VersionStats)> },
    /// Every wave passed: the old version is being unloaded; `waiting`: not yet.
    Finishing { waiting: BTreeSet<String> },
    /// Rolling the current wave back: weights first, then unloads.
    RollingBack {
        reason: String,
        weights_waiting: BTreeSet<String>,
        unload_waiting: BTreeSet<String>,
    },
    /// Done: every region on the new version, the old one unloaded.
    Finished,
    /// Stopped after a failure: the new version unloaded where it was not validated.
    RolledBack { reason: String },
}

/// One line of the rollout's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub at_ms: u64,
    pub text: String,
}

/// The rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    plan: Plan,
    wave: usize,
    phase: Phase,
    /// Each region's weight of the new version now (percent): what the machine last ordered.
    new_share: BTreeMap<String, u8>,
    /// The first wave has passed every step.
    validated: bool,
    log: Vec<Event>,
}

impl Rollout {
    pub fn new(plan: Plan) -> Rollout {
        let new_share = plan.regions().map(|r| (r.to_owned(), 0)).collect();
        Rollout { plan, wave: 0, phase: Phase::Ready, new_share, validated: false, log: vec![] }
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    /// The index of the wave in progress.
    pub fn wave(&self) -> usize {
        self.wave
    }

    pub fn validated(&self) -> bool {
        self.validated
    }

    /// Each region's share of the new version, percent, as last ordered.
    pub fn new_share(&self) -> &BTreeMap<String, u8> {
        &self.new_share
    }

    pub fn log(&self) -> &[Event] {
        &self.log
    }

    /// Whether it has ended (finished or rolled back).
    pub fn is_over(&self) -> bool {
        matches!(self.phase, Phase::Finished | Phase::RolledBack { .. })
    }

    fn note(&mut self, now_ms: u64, text: String) {
        self.log.push(Event { at_ms: now_ms, text });
    }

    fn wave_regions(&self) -> Vec<String> {
        self.plan.waves.get(self.wave).cloned().unwrap_or_default()
    }

    /// The actions the current phase waits on: what a driver that resumes this state (after
    /// a restart) performs again. Every action is idempotent on the fleet's side.
    pub fn pending_actions(&self) -> Vec<Action> {
        let weights = |region: &String, share: u8| {
            let mut weights = vec![];
            if share < 100 {
                weights.push((self.plan.from.clone(), 100 - share));
            }
            if share > 0 {
                weights.push((self.plan.to.clone(), share));
            }
            Action::Weights { region: region.clone(), weights }
        };
        match &self.phase {
            Phase::Loading { waiting, .. } => waiting
                .iter()
                .map(|region| Action::Load {
                    region: region.clone(),
                    version: self.plan.to.clone(),
                    nodes: self.plan.nodes_per_region,
                })
                .collect(),
            Phase::Applying { step, waiting, .. } => {
                waiting.iter().map(|r| weights(r, self.plan.steps[*step])).collect()
            }
            Phase::RollingBack { weights_waiting, unload_waiting, .. } => {
                weights_waiting
                    .iter()
                    .map(|r| weights(r, 0))
                    .chain(unload_waiting.difference(weights_waiting).map(|r| Action::Unload {
                        region: r.clone(),
                        version: self.plan.to.clone(),
                    }))
                    .collect()
            }
            Phase::Finishing { waiting } => waiting
                .iter()
                .map(|r| Action::Unload { region: r.clone(), version: self.plan.from.clone() })
                .collect(),
            Phase::Ready | Phase::Soaking { .. } | Phase::Finished | Phase::RolledBack { .. } => {
                vec![]
            }
        }
    }

    /// Starts the first wave.
    pub fn start(&mut self, now_ms: u64) -> Vec<Action> {
        if self.phase != Phase::Ready {
            return vec![];
        }
        self.note(
            now_ms,
            format!("rollout of {} {} → {} begins", self.plan.model, self.plan.from, self.plan.to),
        );
        self.begin_wave(now_ms)
    }

    fn begin_wave(&mut self, now_ms: u64) -> Vec<Action> {
        let regions = self.wave_regions();
        self.note(
            now_ms,
            format!("wave {}: loading {} in {}", self.wave + 1, self.plan.to, regions.join(", ")),
        );
        self.phase =
            Phase::Loading { since_ms: now_ms, waiting: regions.iter().cloned().collect() };
        regions
            .into_iter()
            .map(|region| Action::Load {
                region,
                version: self.plan.to.clone(),
                nodes: self.plan.nodes_per_region,
            })
            .collect()
    }

    fn apply_step(&mut self, step: usize, now_ms: u64) -> Vec<Action> {
        let share = self.plan.steps[step];
        let regions = self.wave_regions();
        self.note(
            now_ms,
            format!(
                "wave {} step {}: {} at {share} % in {}",
                self.wave + 1,
                step + 1,
                self.plan.to,
                regions.join(", ")
            ),
        );
        self.phase =
            Phase::Applying { step, since_ms: now_ms, waiting: regions.iter().cloned().collect() };
        regions.into_iter().map(|r| self.weights(r, share)).collect()
    }

    fn weights(&mut self, region: String, share: u8) -> Action {
        self.new_share.insert(region.clone(), share);
        let mut weights = vec![];
        if share < 100 {
            weights.push((self.plan.from.clone(), 100 - share));
        }
        if share > 0 {
            weights.push((self.plan.to.clone(), share));
        }
        Action::Weights { region, weights }
    }

    /// Rolls the current wave back.
    fn fail(&mut self, reason: String, now_ms: u64) -> Vec<Action> {
        let regions = self.wave_regions();
        self.note(
            now_ms,
            format!("wave {} failed: {reason}; rolling back {}", self.wave + 1, regions.join(", ")),
        );
        self.phase = Phase::RollingBack {
            reason,
            weights_waiting: regions.iter().cloned().collect(),
            unload_waiting: regions.iter().cloned().collect(),
        };
        regions.into_iter().map(|r| self.weights(r, 0)).collect()
    }

    /// Advances on the clock alone (timeouts; a soak that ended without new figures).
    pub fn tick(&mut self, now_ms: u64) -> Vec<Action> {
        let g = self.plan.gates.clone();
        match &self.phase {
            Phase::Loading { since_ms, waiting } | Phase::Applying { since_ms, waiting, .. }
                if now_ms.saturating_sub(*since_ms) > g.apply_timeout_s * 1000 =>
            {
                let what = if matches!(self.phase, Phase::Loading { .. }) {
                    "loading"
                } else {
                    "applying weights"
                };
                let late: Vec<String> = waiting.iter().cloned().collect();
                self.fail(
                    format!("{what} in {} took over {} s", late.join(", "), g.apply_timeout_s),
                    now_ms,
                )
            }
            Phase::Soaking { .. } => self.judge(now_ms),
            _ => vec![],
        }
    }

    /// Takes one report from the driver.
    pub fn handle(&mut self, input: Input, now_ms: u64) -> Vec<Action> {
        if self.is_over() {
            return vec![];
        }
        if let Input::Abort { reason } = &input {
            return match self.phase {
                Phase::RollingBack { .. } | Phase::Finishing { .. } | Phase::Ready => vec![],
                _ => self.fail(format!("aborted: {reason}"), now_ms),
            };
        }
        match input {
            Input::Abort { .. } => vec![],
            Input::Loaded { region, result } => {
                let Phase::Loading { waiting, .. } = &mut self.phase else { return vec![] };
                if !waiting.contains(&region) {
                    return vec![]; // a duplicate or a stranger's report
                }
                if let Err(why) = result {
                    let reason = format!("loading {} in {region} failed: {why}", self.plan.to);
                    return self.fail(reason, now_ms);
                }
                waiting.remove(&region);
                if waiting.is_empty() { self.apply_step(0, now_ms) } else { vec![] }
            }
            Input::WeightsApplied { region } => match &mut self.phase {
                Phase::Applying { step, waiting, .. } => {
                    waiting.remove(&region);
                    if waiting.is_empty() {
                        let step = *step;
                        self.phase =
                            Phase::Soaking { step, since_ms: now_ms, figures: BTreeMap::new() };
                    }
                    vec![]
                }
                // Traffic is off the new version there: now unload it (through the drain path).
                Phase::RollingBack { weights_waiting, unload_waiting, .. } => {
                    if weights_waiting.remove(&region) && unload_waiting.contains(&region) {
                        vec![Action::Unload { region, version: self.plan.to.clone() }]
                    } else {
                        vec![]
                    }
                }
                _ => vec![],
            },
            Input::Figures { region, old, new } => {
                let in_wave = self.plan.waves.get(self.wave).is_some_and(|w| w.contains(&region));
                let Phase::Soaking { figures, .. } = &mut self.phase else { return vec![] };
                if in_wave {
                    figures.insert(region, (old, new));
                }
                self.judge(now_ms)
            }
            Input::Unloaded { region } => match &mut self.phase {
                Phase::RollingBack { weights_waiting, unload_waiting, reason } => {
                    unload_waiting.remove(&region);
                    if !(weights_waiting.is_empty() && unload_waiting.is_empty()) {
                        return vec![];
                    }
                    let reason = reason.clone();
                    let on_new: Vec<&str> = self
                        .new_share
                        .iter()
                        .filter(|(_, s)| **s > 0)
                        .map(|(r, _)| r.as_str())
                        .collect();
                    let text = if on_new.is_empty() {
                        format!("rolled back: every region on {}", self.plan.from)
                    } else {
                        format!(
                            "halted: {} on {}, the rest on {}",
                            on_new.join(", "),
                            self.plan.to,
                            self.plan.from
                        )
                    };
                    self.note(now_ms, text);
                    self.phase = Phase::RolledBack { reason };
                    vec![]
                }
                Phase::Finishing { waiting } => {
                    waiting.remove(&region);
                    if waiting.is_empty() {
                        self.phase = Phase::Finished;
                        self.note(now_ms, format!("finished: every region on {}", self.plan.to));
                    }
                    vec![]
                }
                _ => vec![],
            },
        }
    }

    /// Judges the current step on the figures so far.
    fn judge(&mut self, now_ms: u64) -> Vec<Action> {
        let Phase::Soaking { step, since_ms, figures } = &self.phase else { return vec![] };
        let (step, since_ms) = (*step, *since_ms);
        let g = &self.plan.gates;
        let soaked_s = now_ms.saturating_sub(since_ms) / 1000;
        let mut all_pass = true;
        let mut waiting = None;
        for region in self.plan.waves.get(self.wave).map_or(&[][..], Vec::as_slice) {
            let (old, new) = figures.get(region).copied().unwrap_or_default();
            match judge(g, &old, &new, soaked_s) {
                Verdict::Pass => {}
                Verdict::Wait(why) => {
                    all_pass = false;
                    waiting.get_or_insert(format!("{region}: {why}"));
                }
                Verdict::Fail(why) => return self.fail(format!("{region}: {why}"), now_ms),
            }
        }
        if !all_pass {
            if soaked_s > g.step_timeout_s {
                let why = waiting.unwrap_or_default();
                return self.fail(
                    format!("step not judged within {} s ({why})", g.step_timeout_s),
                    now_ms,
                );
            }
            return vec![];
        }
        self.note(now_ms, format!("wave {} step {} passed", self.wave + 1, step + 1));
        if step + 1 < self.plan.steps.len() {
            return self.apply_step(step + 1, now_ms);
        }
        if self.wave == 0 {
            self.validated = true;
            self.note(now_ms, format!("{} validated in wave 1", self.plan.to));
        }
        self.wave += 1;
        if self.wave < self.plan.waves.len() {
            return self.begin_wave(now_ms);
        }
        // Every region at 100 %: the old version can go.
        let regions: Vec<String> = self.plan.regions().map(str::to_owned).collect();
        self.note(now_ms, format!("every wave passed: unloading {}", self.plan.from));
        self.phase = Phase::Finishing { waiting: regions.iter().cloned().collect() };
        regions
            .into_iter()
            .map(|region| Action::Unload { region, version: self.plan.from.clone() })
            .collect()
    }
}
