//! A rollout plan (`rollout.toml`): which model moves from which version to which, the regions
//! in waves, the traffic steps, and the gates each step must pass. Unknown keys are errors;
//! every error names its key.
//!
//! ```toml
//! model = "llama-3.1-8b"
//! from = "v1"
//! to = "v2"
//! waves = [["tor"], ["mtl"], ["van", "sea"]]   # the first wave validates the new version
//! steps = [5, 25, 100]                          # the new version's share of traffic, percent
//! nodes_per_region = 1                          # nodes that load the new version beside the old
//! [gates]
//! soak_s = 120
//! min_requests = 200
//! ttft_p99_ratio = 1.10
//! error_z = 2.33
//! [load.v2]                                     # the node load API's body for a version
//! model = "meta-llama/Llama-3.1-8B-Instruct"    # (`id` and `version` are added)
//! revision = "0e9e39f"
//! [load.v1]                                     # needed to restore nodes a rollback converted
//! model = "meta-llama/Llama-3.1-8B-Instruct"
//! revision = "5206a32"
//! [[probes]]                                    # correctness probes, every poll, each new node
//! prompt = "What is the capital of France? One word."
//! contains = "Paris"
//! [[probes]]
//! prompt = "Repeat: the quick brown fox"
//! same_as_old = true                            # temperature 0: the old version's answer
//! ```

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// The whole plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// The logical model (the registry's name, as requests ask for it).
    pub model: String,
    /// The version serving today.
    pub from: String,
    /// The version rolled out.
    pub to: String,
    /// Regions in waves, in order. The first wave validates the new version: until every one of
    /// its steps has passed, no other region sees it.
    pub waves: Vec<Vec<String>>,
    /// The new version's share of each region's traffic at each step, percent, increasing, the
    /// last 100. Default `[5, 25, 100]`.
    #[serde(default = "default_steps")]
    pub steps: Vec<u8>,
    /// Nodes per region that load the new version beside the old one. Default 1.
    #[serde(default = "one")]
    pub nodes_per_region: u32,
    /// Regions that must stay on the old version until the new one is validated (the regions
    /// outside the first wave): at least this many. Default and minimum 2.
    #[serde(default = "two")]
    pub hold_regions: usize,
    #[serde(default)]
    pub gates: Gates,
    /// Per version, the body of the node's `POST /v1/models/load` that loads it (`model` and
    /// `revision`, or `path`, plus `gpu`, `memory_mb`, `files`, `options`); the driver sets
    /// `id` (the plan's model) and `version`. `to`'s is required; `from`'s only when a region
    /// has no spare node, so a node had to give up the old version for the new one and a
    /// rollback must restore it.
    #[serde(default)]
    pub load: std::collections::BTreeMap<String, toml::Table>,
    /// Correctness probes: sent to every node serving the new version at every poll of a step;
    /// each answer that does not meet its expectation is a correctness failure.
    #[serde(default)]
    pub probes: Vec<Probe>,
}

/// One correctness probe: a prompt (temperature 0) and what its answer must be.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Probe {
    pub prompt: String,
    /// The answer must contain this text.
    #[serde(default)]
    pub contains: Option<String>,
    /// The answer must equal the old version's to the same prompt, asked of a node of the
    /// same region (for releases that must not change outputs: a re-quantisation check, a
    /// serving-stack upgrade).
    #[serde(default)]
    pub same_as_old: bool,
    /// Tokens asked for. Default 16.
    #[serde(default = "d16")]
    pub max_tokens: u32,
}

fn d16() -> u32 {
    16
}

/// What every step must show before the next one, and what fails it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gates {
    /// A step lasts at least this long, s. Default 120.
    #[serde(default = "d120")]
    pub soak_s: u64,
    /// And the new version has answered at least this many requests in each region of the
    /// wave during it. Default 200.
    #[serde(default = "d200")]
    pub min_requests: u64,
    /// The new version's TTFT p99 at most this multiple of the old one's (judged at the end of
    /// the soak). Default 1.10.
    #[serde(default = "d110")]
    pub ttft_p99_ratio: f64,
    /// The new version's error rate fails the step when it is above the old one's by more than
    /// this many standard errors (a one-sided two-proportion z-test; 2.33 ≈ 99 %). Judged as
    /// soon as the new version has `min_requests`. Default 2.33.
    #[serde(default = "d233")]
    pub error_z: f64,
    /// Correctness-probe failures of the new version tolerated per step. Default 0.
    #[serde(default)]
    pub max_correctness_failures: u64,
    /// Loading the new version, or applying a step's weights, may take this long, s. Default 600.
    #[serde(default = "d600")]
    pub apply_timeout_s: u64,
    /// A step that has not seen `min_requests` within this long fails: it cannot be judged.
    /// Default 1800.
    #[serde(default = "d1800")]
    pub step_timeout_s: u64,
}

impl Default for Gates {
    fn default() -> Self {
        Gates {
            soak_s: 120,
            min_requests: 200,
            ttft_p99_ratio: 1.10,
            error_z: 2.33,
            max_correctness_failures: 0,
            apply_timeout_s: 600,
            step_timeout_s: 1800,
        }
    }
}

fn default_steps() -> Vec<u8> {
    vec![5, 25, 100]
}
fn one() -> u32 {
    1
}
fn two() -> usize {
    2
}
fn d120() -> u64 {
    120
}
fn d200() -> u64 {
    200
}
fn d110() -> f64 {
    1.10
}
fn d233() -> f64 {
    2.33
}
fn d600() -> u64 {
    600
}
fn d1800() -> u64 {
    1800
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("rollout plan: {0}")]
    Parse(String),
    #[error("rollout plan: `{key}`: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> PlanError {
    PlanError::Invalid { key: key.into(), message: message.into() }
}

impl Plan {
    pub fn from_toml(text: &str) -> Result<Plan, PlanError> {
        let plan: Plan = toml::from_str(text).map_err(|e| PlanError::Parse(e.to_string()))?;
        plan.validate()?;
        Ok(plan)
    }

    pub fn validate(&self) -> Result<(), PlanError> {
        for (key, v) in [("model", &self.model), ("from", &self.from), ("to", &self.to)] {
            if v.trim().is_empty() {
                return Err(invalid(key, "must not be empty"));
            }
        }
        if self.from == self.to {
            return Err(invalid("to", "must differ from `from`"));
        }
        if self.waves.is_empty() {
            return Err(invalid("waves", "at least one wave of regions"));
        }
        let mut seen = BTreeSet::new();
        for (i, w) in self.waves.iter().enumerate() {
            if w.is_empty() {
                return Err(invalid(format!("waves[{i}]"), "an empty wave"));
            }
            for r in w {
                if r.trim().is_empty() {
                    return Err(invalid(format!("waves[{i}]"), "an empty region name"));
                }
                if !seen.insert(r.as_str()) {
                    return Err(invalid(format!("waves[{i}]"), format!("`{r}` is in two waves")));
                }
            }
        }
        if self.hold_regions < 2 {
            return Err(invalid("hold_regions", "at least 2"));
        }
        let held = seen.len() - self.waves[0].len();
        if held < self.hold_regions {
            return Err(invalid(
                "waves",
                format!(
                    "the first wave validates the new version and {} region(s) must stay on `{}` \
                     until then; only {held} are outside it",
                    self.hold_regions, self.from
                ),
            ));
        }
        if self.steps.is_empty()
            || self.steps.windows(2).any(|w| w[0] >= w[1])
            || self.steps.first().is_some_and(|s| *s == 0)
            || self.steps.last() != Some(&100)
        {
            return Err(invalid("steps", "increasing percentages from 1, the last 100"));
        }
        if !self.load.contains_key(&self.to) {
            return Err(invalid(
                format!("load.{}", self.to),
                "how nodes load the new version (the body of POST /v1/models/load)",
            ));
        }
        for (v, body) in &self.load {
            if v != &self.from && v != &self.to {
                return Err(invalid(format!("load.{v}"), "neither `from` nor `to`"));
            }
            for key in body.keys() {
                match key.as_str() {
                    "id" | "version" => {
                        return Err(invalid(format!("load.{v}.{key}"), "set by the rollout"));
                    }
                    "model" | "revision" | "path" | "gpu" | "memory_mb" | "files" | "options" => {}
                    _ => {
                        return Err(invalid(
                            format!("load.{v}.{key}"),
                            "unknown (model, revision, path, gpu, memory_mb, files, options)",
                        ));
                    }
                }
            }
            if !(body.contains_key("model") || body.contains_key("path")) {
                return Err(invalid(format!("load.{v}"), "needs `model` or `path`"));
            }
        }
        for (i, p) in self.probes.iter().enumerate() {
            if p.prompt.trim().is_empty() {
                return Err(invalid(format!("probes[{i}].prompt"), "must not be empty"));
            }
            if p.contains.is_some() == p.same_as_old {
                return Err(invalid(
                    format!("probes[{i}]"),
                    "exactly one expectation: `contains` or `same_as_old = true`",
                ));
            }
            if p.contains.as_deref().is_some_and(str::is_empty) {
                return Err(invalid(format!("probes[{i}].contains"), "must not be empty"));
            }
            if !(1..=4096).contains(&p.max_tokens) {
                return Err(invalid(format!("probes[{i}].max_tokens"), "1 to 4096"));
            }
        }
        if self.nodes_per_region == 0 {
            return Err(invalid("nodes_per_region", "at least 1"));
        }
        let g = &self.gates;
        if !(g.ttft_p99_ratio.is_finite() && g.ttft_p99_ratio >= 1.0) {
            return Err(invalid("gates.ttft_p99_ratio", "a number ≥ 1"));
        }
        if !(g.error_z.is_finite() && g.error_z > 0.0) {
            return Err(invalid("gates.error_z", "a number > 0"));
        }
        if g.min_requests == 0 {
            return Err(invalid("gates.min_requests", "at least 1"));
        }
        if g.apply_timeout_s == 0 || g.step_timeout_s <= g.soak_s {
            return Err(invalid(
                "gates",
                "apply_timeout_s ≥ 1 and step_timeout_s longer than soak_s",
            ));
        }
        Ok(())
    }

    /// Every region of the plan, wave by wave.
    pub fn regions(&self) -> impl Iterator<Item = &str> {
        self.waves.iter().flatten().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

    use super::*;

    pub(crate) const SAMPLE: &str = r#"
model = "llama"
from = "v1"
to = "v2"
waves = [["tor"], ["mtl"], ["van", "sea"]]
load = { v2 = { path = "/models/llama-v2" } }
"#;

    #[test]
    fn the_sample_parses_with_its_defaults() {
        let p = Plan::from_toml(SAMPLE).unwrap();
        assert_eq!(p.steps, [5, 25, 100]);
        assert_eq!((p.nodes_per_region, p.hold_regions), (1, 2));
        assert_eq!(p.gates, Gates::default());
        assert_eq!(p.regions().collect::<Vec<_>>(), ["tor", "mtl", "van", "sea"]);
    }

    #[test]
    fn every_mistake_names_its_key() {
        let cases = [
            (SAMPLE.replace("to = \"v2\"", "to = \"v1\""), "to"),
            (SAMPLE.replace("[\"mtl\"], ", "[\"tor\"], "), "waves[1]"),
            (
                SAMPLE.replace(
                    "[[\"tor\"], [\"mtl\"], [\"van\", \"sea\"]]",
                    "[[\"tor\", \"mtl\", \"van\"], [\"sea\"]]",
                ),
                "waves",
            ),
            (
                SAMPLE.replace("[[\"tor\"], [\"mtl\"], [\"van\", \"sea\"]]", "[[\"tor\"], []]"),
                "waves[1]",
            ),
            (format!("{SAMPLE}steps = [5, 5, 100]\n"), "steps"),
            (format!("{SAMPLE}steps = [5, 50]\n"), "steps"),
            (format!("{SAMPLE}hold_regions = 1\n"), "hold_regions"),
            (format!("{SAMPLE}nodes_per_region = 0\n"), "nodes_per_region"),
            (format!("{SAMPLE}[gates]\nttft_p99_ratio = 0.9\n"), "gates.ttft_p99_ratio"),
            (format!("{SAMPLE}[gates]\nsoak_s = 2000\n"), "gates"),
            (SAMPLE.replace("{ v2 = ", "{ v3 = "), "load.v2"),
            (SAMPLE.replace("llama-v2\" }", "llama-v2\", version = \"v9\" }"), "load.v2.version"),
            (SAMPLE.replace("path = ", "gpus = "), "load.v2.gpus"),
            (format!("{SAMPLE}[[probes]]\nprompt = \"hi\"\n"), "probes[0]"),
            (
                format!(
                    "{SAMPLE}[[probes]]\nprompt = \"hi\"\ncontains = \"a\"\nsame_as_old = true\n"
                ),
                "probes[0]",
            ),
            (
                format!("{SAMPLE}[[probes]]\nprompt = \" \"\nsame_as_old = true\n"),
                "probes[0].prompt",
            ),
        ];
        for (text, key) in cases {
            let e = Plan::from_toml(&text).unwrap_err().to_string();
            assert!(e.contains(&format!("`{key}`")), "{key}: {e}");
        }
        assert!(
            Plan::from_toml(&format!("{SAMPLE}bogus = 1\n"))
                .unwrap_err()
                .to_string()
                .contains("bogus")
        );
    }
}
