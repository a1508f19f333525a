//! Correctness probes, decided (issue 16): health that checks answers, not only status.
//!
//! A node can answer `/health` perfectly and still return garbage (a corrupted model file, a
//! wrong quantisation, a broken backend). So discovery also asks every node, for every model
//! it serves, a short fixed prompt at temperature 0 (`answer_probe.rs` sends it) and compares
//! a fingerprint of the normalised answer with the one expected for that model **version**.
//!
//! This module is the decision, sans-IO as `quinn-proto` is: no clock (every call takes
//! `now`), no network, no randomness, so every rule below is unit- and property-tested.
//!
//! - **The expected fingerprint** of a `(model, version)` is configured
//!   (`[[correctness.expected]]`) or **learnt**: the first fingerprint seen `learn_quorum`
//!   times while holding a strict majority of the answers seen for that version. Random
//!   garbage never reaches a majority; if none emerges within `learn_max_answers` answers the
//!   version is marked `no_consensus` (the model is not deterministic at temperature 0) and
//!   never judged. Until then answers are kept (a node's recent fingerprints), and judged
//!   retroactively the moment the fingerprint is learnt.
//! - **A node's window** per model holds its last `window` results: an answer's fingerprint,
//!   or an error (a 5xx, a body that is no completion, a timeout). Unavailability (a refused
//!   connection, 429/503 shedding, 401/403, an unknown model) is /health's business or a
//!   placement race: counted, never judged.
//! - **Ejection on a confidence interval**, not a sample: a node is ejected for a model when
//!   the Wilson lower bound of its bad-answer rate (wrong + errors over judged) exceeds
//!   `eject_above`. Configuration refuses an `eject_above` that a single bad sample could
//!   cross, so one flaky answer never ejects.
//! - **Recovery is verified**: an ejected node rejoins only after `recover_after` consecutive
//!   correct answers (any bad one restarts the run); it rejoins with a window holding just
//!   that run.
//! - A node whose model changes version is judged afresh against the new version.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use edgeroute_core::health::wilson_lower;
use serde::Serialize;

/// A 64-bit FNV-1a hash of an answer's normalised text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Fingerprint(pub u64);

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// The answer's fingerprint: whitespace runs collapsed to one space, ends trimmed, lowercase.
/// (Spacing and case are what serving stacks vary without the model changing its mind.)
pub fn fingerprint(answer: &str) -> Fingerprint {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |b: u8| {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    };
    let mut first = true;
    for word in answer.split_whitespace() {
        if !first {
            feed(b' ');
        }
        first = false;
        for c in word.chars().flat_map(char::to_lowercase) {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                feed(b);
            }
        }
    }
    Fingerprint(h)
}

/// What one probe brought back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A completion: its fingerprint.
    Answer(Fingerprint),
    /// A bad answer that is not an answer: a 5xx, a body that is no completion, a timeout.
    Error(String),
    /// No verdict possible: refused connection, shed (429/503), not authorised, model not
    /// there (a placement race). Counted, never judged.
    Unavailable(String),
}

/// How one probe was judged (the metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Judgement {
    Correct,
    Wrong,
    Error,
    /// Not judged: the version's fingerprint is not known yet (or never will be).
    Unjudged,
    Unavailable,
}

impl Judgement {
    pub fn label(self) -> &'static str {
        match self {
            Judgement::Correct => "correct",
            Judgement::Wrong => "wrong",
            Judgement::Error => "error",
            Judgement::Unjudged => "unjudged",
            Judgement::Unavailable => "unavailable",
        }
    }

    pub const ALL: [Judgement; 5] = [
        Judgement::Correct,
        Judgement::Wrong,
        Judgement::Error,
        Judgement::Unjudged,
        Judgement::Unavailable,
    ];
}

/// The machine's parameters (`[correctness]`; see `config.rs` for the defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Params {
    /// Results kept per (node, model).
    pub window: usize,
    /// z of the Wilson interval.
    pub z: f64,
    /// Eject when the Wilson lower bound of the bad-answer rate exceeds this.
    pub eject_above: f64,
    /// Consecutive correct answers before an ejected node rejoins.
    pub recover_after: u32,
    /// Agreeing answers that make a fingerprint learnt (with a strict majority).
    pub learn_quorum: u32,
    /// Answers after which a version with no majority is given up on (`no_consensus`).
    pub learn_max_answers: u32,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            window: 20,
            z: 1.96,
            eject_above: 0.3,
            recover_after: 3,
            learn_quorum: 3,
            learn_max_answers: 30,
        }
    }
}

impl Params {
    /// The Wilson lower bound of one bad result out of one: the most a single sample can show.
    pub fn single_sample_bound(&self) -> f64 {
        wilson_lower(1, 1, self.z)
    }
}

/// Where a version's expected fingerprint came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Basis {
    Configured,
    Learnt,
}

#[derive(Debug, Clone, Default)]
struct Learner {
    expected: Option<(Fingerprint, Basis)>,
    /// Fingerprints seen while learning and how often (bounded by `learn_max_answers`).
    tally: Vec<(Fingerprint, u32)>,
    answers: u32,
    gave_up: bool,
}

impl Learner {
    fn expected(&self) -> Option<Fingerprint> {
        self.expected.map(|(f, _)| f)
    }

    /// Counts one answer; returns true when it made the fingerprint learnt.
    fn vote(&mut self, fp: Fingerprint, p: &Params) -> bool {
        if self.expected.is_some() || self.gave_up {
            return false;
        }
        self.answers += 1;
        match self.tally.iter_mut().find(|(f, _)| *f == fp) {
            Some((_, n)) => *n += 1,
            None => self.tally.push((fp, 1)),
        }
        let leader = self.tally.iter().copied().max_by_key(|(_, n)| *n);
        if let Some((f, n)) = leader
            && n >= p.learn_quorum.max(1)
            && 2 * n > self.answers
        {
            self.expected = Some((f, Basis::Learnt));
            self.tally.clear();
            return true;
        }
        if self.answers >= p.learn_max_answers.max(1) {
            self.gave_up = true;
            self.tally.clear();
        }
        false
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sample {
    Answer(Fingerprint),
    Error,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub correct: u64,
    pub wrong: u64,
    pub error: u64,
    pub unjudged: u64,
    pub unavailable: u64,
}

#[derive(Debug, Clone)]
struct NodeModel {
    version: String,
    window: VecDeque<Sample>,
    /// Probe round trips of answered probes, ms (the last `window`).
    latencies: VecDeque<u64>,
    ejected_at: Option<Duration>,
    /// Consecutive correct answers while ejected.
    run: u32,
    counts: Counts,
    last_error: Option<String>,
}

impl NodeModel {
    fn new(version: &str) -> Self {
        NodeModel {
            version: version.to_owned(),
            window: VecDeque::new(),
            latencies: VecDeque::new(),
            ejected_at: None,
            run: 0,
            counts: Counts::default(),
            last_error: None,
        }
    }

    /// (bad, judged) over the window against `expected`.
    fn tally(&self, expected: Option<Fingerprint>) -> (u64, u64) {
        let mut bad = 0;
        let mut n = 0;
        for s in &self.window {
            match (s, expected) {
                (Sample::Error, _) => {
                    bad += 1;
                    n += 1;
                }
                (Sample::Answer(f), Some(e)) => {
                    bad += u64::from(*f != e);
                    n += 1;
                }
                (Sample::Answer(_), None) => {}
            }
        }
        (bad, n)
    }

    /// Ejects when the window's evidence says so; returns whether it did.
    fn check_eject(&mut self, expected: Option<Fingerprint>, p: &Params, now: Duration) -> bool {
        if self.ejected_at.is_some() {
            return false;
        }
        let (bad, n) = self.tally(expected);
        if n > 0 && wilson_lower(bad, n, p.z) > p.eject_above {
            self.ejected_at = Some(now);
            self.run = 0;
            return true;
        }
        false
    }
}

/// A (node, model)'s state as `/v1/nodes` and explain show it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Status {
    /// `learning` (no expected fingerprint yet), `no_consensus` (none will be learnt),
    /// `correct`, `suspect` (bad answers seen, not enough to eject), `ejected`, `recovering`
    /// (ejected, a run of correct answers under way).
    pub state: &'static str,
    pub version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub basis: Option<Basis>,
    /// Bad results over judged results in the window.
    pub bad: u64,
    pub judged: u64,
    /// The Wilson interval of the bad-answer rate over the window.
    pub bad_rate_lower: f64,
    pub bad_rate_upper: f64,
    /// Consecutive correct answers since the ejection (of `recover_after`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recovery_run: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ejected_for_ms: Option<u64>,
    /// Median probe round trip over the window, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_p50_ms: Option<u64>,
    pub probes: Counts,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Why the node is not served for the model, when it is ejected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Status {
    pub fn ejected(&self) -> bool {
        matches!(self.state, "ejected" | "recovering")
    }

    /// Why the node is not served for the model (when ejected), in words.
    fn explain(&self, p: &Params) -> String {
        format!(
            "ejected by correctness probes: {} of the last {} probe answers wrong or failed \
             (bad-rate lower bound {:.2} > {:.2}); rejoins after {} consecutive correct ({} so far)",
            self.bad,
            self.judged,
            self.bad_rate_lower,
            p.eject_above,
            p.recover_after,
            self.recovery_run.unwrap_or(0),
        ) + &self.latency_p50_ms.map(|l| format!("; probe p50 {l} ms")).unwrap_or_default()
    }
}

/// What one observation changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub judgement: Judgement,
    /// (node, model) pairs whose ejection changed (ejected or rejoined): the probed one, or
    /// every node of the version when its fingerprint was just learnt.
    pub changed: Vec<(String, String)>,
    /// The version's fingerprint was learnt by this answer.
    pub learnt: Option<Fingerprint>,
}

/// The correctness machine: learnt fingerprints per (model, version), windows per
/// (node, model).
#[derive(Debug, Clone, Default)]
pub struct Machine {
    params: Params,
    versions: BTreeMap<(String, String), Learner>,
    nodes: BTreeMap<(String, String), NodeModel>,
}

impl Machine {
    pub fn new(params: Params) -> Self {
        Machine { params, versions: BTreeMap::new(), nodes: BTreeMap::new() }
    }

    pub fn params(&self) -> &Params {
        &self.params
    }

    /// Pins `(model, version)`'s expected fingerprint (configuration). `version` empty: the
    /// model as served by nodes that name no version. Each version is pinned apart.
    pub fn expect(&mut self, model: &str, version: &str, fp: Fingerprint) {
        let l = self.versions.entry((model.to_owned(), version.to_owned())).or_default();
        l.expected = Some((fp, Basis::Configured));
        l.tally.clear();
    }

    /// The expected fingerprint of `(model, version)`, if known.
    pub fn expected(&self, model: &str, version: &str) -> Option<(Fingerprint, Basis)> {
        self.versions.get(&(model.to_owned(), version.to_owned())).and_then(|l| l.expected)
    }

    /// One probe of `model` (at `version`; empty when the node names none) on `node` ended
    /// at `now` after `latency` with `outcome`.
    pub fn observe(
        &mut self,
        node: &str,
        model: &str,
        version: &str,
        outcome: Outcome,
        latency: Duration,
        now: Duration,
    ) -> Observed {
        let p = self.params;
        let key = (node.to_owned(), model.to_owned());
        let vkey = (model.to_owned(), version.to_owned());
        let nm = self.nodes.entry(key.clone()).or_insert_with(|| NodeModel::new(version));
        let mut changed = Vec::new();
        if nm.version != version {
            // A new version is judged afresh; an ejection for the old one does not carry.
            if nm.ejected_at.is_some() {
                changed.push(key.clone());
            }
            *nm = NodeModel::new(version);
        }
        let learner = self.versions.entry(vkey).or_default();
        let mut learnt = None;
        let judgement = match &outcome {
            Outcome::Unavailable(why) => {
                nm.counts.unavailable += 1;
                nm.last_error = Some(why.clone());
                return Observed { judgement: Judgement::Unavailable, changed, learnt };
            }
            Outcome::Error(why) => {
                nm.last_error = Some(why.clone());
                nm.counts.error += 1;
                push(&mut nm.window, Sample::Error, p.window);
                Judgement::Error
            }
            Outcome::Answer(fp) => {
                push(&mut nm.latencies, latency.as_millis() as u64, p.window);
                push(&mut nm.window, Sample::Answer(*fp), p.window);
                if learner.vote(*fp, &p) {
                    learnt = Some(*fp);
                }
                match learner.expected() {
                    None => {
                        nm.counts.unjudged += 1;
                        Judgement::Unjudged
                    }
                    Some(e) if e == *fp => {
                        nm.counts.correct += 1;
                        Judgement::Correct
                    }
                    Some(_) => {
                        nm.counts.wrong += 1;
                        Judgement::Wrong
                    }
                }
            }
        };
        let expected = learner.expected();
        if nm.ejected_at.is_some() {
            match judgement {
                Judgement::Correct => nm.run += 1,
                Judgement::Wrong | Judgement::Error => nm.run = 0,
                Judgement::Unjudged | Judgement::Unavailable => {}
            }
            if nm.run >= p.recover_after.max(1) {
                // Rejoins with a window holding just the verified run.
                nm.ejected_at = None;
                nm.window.clear();
                if let Some(e) = expected {
                    for _ in 0..nm.run {
                        push(&mut nm.window, Sample::Answer(e), p.window);
                    }
                }
                nm.run = 0;
                changed.push(key.clone());
            }
        } else if nm.check_eject(expected, &p, now) {
            changed.push(key.clone());
        }
        if learnt.is_some() {
            // Everything kept while learning is judged now.
            for ((n, m), other) in self.nodes.iter_mut() {
                if m == model
                    && other.version == version
                    && (n.as_str(), m.as_str()) != (node, model)
                    && other.check_eject(expected, &p, now)
                {
                    changed.push((n.clone(), m.clone()));
                }
            }
        }
        Observed { judgement, changed, learnt }
    }

    /// Whether `node` is ejected for `model`.
    pub fn is_ejected(&self, node: &str, model: &str) -> bool {
        self.nodes.get(&(node.to_owned(), model.to_owned())).is_some_and(|n| n.ejected_at.is_some())
    }

    /// (node, model) pairs ejected now.
    pub fn ejected(&self) -> impl Iterator<Item = (&str, &str)> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.ejected_at.is_some())
            .map(|((n, m), _)| (n.as_str(), m.as_str()))
    }

    /// `node`'s state for `model`, if it was ever probed for it.
    pub fn status(&self, node: &str, model: &str, now: Duration) -> Option<Status> {
        let nm = self.nodes.get(&(node.to_owned(), model.to_owned()))?;
        let learner = self.versions.get(&(model.to_owned(), nm.version.clone()));
        let expected = learner.and_then(|l| l.expected);
        let (bad, judged) = nm.tally(expected.map(|(f, _)| f));
        let z = self.params.z;
        let (lower, upper) = if judged == 0 {
            (0.0, 1.0)
        } else {
            (wilson_lower(bad, judged, z), 1.0 - wilson_lower(judged - bad, judged, z))
        };
        let state = match (nm.ejected_at, expected) {
            (Some(_), _) if nm.run > 0 => "recovering",
            (Some(_), _) => "ejected",
            (None, None) if learner.is_some_and(|l| l.gave_up) => "no_consensus",
            (None, _) if bad > 0 => "suspect",
            (None, None) => "learning",
            (None, Some(_)) => "correct",
        };
        let mut lat: Vec<u64> = nm.latencies.iter().copied().collect();
        let p50 = (!lat.is_empty()).then(|| {
            let mid = lat.len() / 2;
            *lat.select_nth_unstable(mid).1
        });
        let mut st = Status {
            state,
            version: nm.version.clone(),
            expected: expected.map(|(f, _)| f.to_string()),
            basis: expected.map(|(_, b)| b),
            bad,
            judged,
            bad_rate_lower: lower,
            bad_rate_upper: upper,
            recovery_run: nm.ejected_at.map(|_| nm.run),
            ejected_for_ms: nm.ejected_at.map(|t| now.saturating_sub(t).as_millis() as u64),
            latency_p50_ms: p50,
            probes: nm.counts,
            last_error: nm.last_error.clone(),
            reason: None,
        };
        if st.ejected() {
            st.reason = Some(st.explain(&self.params));
        }
        Some(st)
    }

    /// Every node probed so far.
    pub fn nodes(&self) -> impl Iterator<Item = &str> {
        let mut last: Option<&str> = None;
        self.nodes.keys().filter_map(move |(n, _)| {
            if last == Some(n.as_str()) {
                return None;
            }
            last = Some(n.as_str());
            Some(n.as_str())
        })
    }

    /// Every model `node` was probed for, with its state.
    pub fn statuses(&self, node: &str, now: Duration) -> BTreeMap<String, Status> {
        self.nodes
            .range((node.to_owned(), String::new())..)
            .take_while(|((n, _), _)| n == node)
            .filter_map(|((_, m), _)| Some((m.clone(), self.status(node, m, now)?)))
            .collect()
    }

    /// Forgets `node` (no longer in the fleet) or its `model` (no longer served there).
    pub fn forget(&mut self, node: &str, model: Option<&str>) {
        self.nodes.retain(|(n, m), _| !(n == node && model.is_none_or(|x| x == m)));
    }

    /// Models tracked for `node`.
    pub fn models_of(&self, node: &str) -> Vec<String> {
        self.nodes
            .range((node.to_owned(), String::new())..)
            .take_while(|((n, _), _)| n == node)
            .map(|((_, m), _)| m.clone())
            .collect()
    }
}

fn push<T>(q: &mut VecDeque<T>, v: T, cap: usize) {
    if q.len() >= cap.max(1) {
        q.pop_front();
    }
    q.push_back(v);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GOOD: Fingerprint = Fingerprint(1);

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A machine with `GOOD` pinned for `m` v1.
    fn pinned() -> Machine {
        let mut m = Machine::new(Params::default());
        m.expect("m", "v1", GOOD);
        m
    }

    fn answer(m: &mut Machine, node: &str, fp: u64, t: u64) -> Observed {
        m.observe(node, "m", "v1", Outcome::Answer(Fingerprint(fp)), ms(20), s(t))
    }

    #[test]
    fn fingerprints_ignore_spacing_and_case_only() {
        assert_eq!(fingerprint("The answer  is\n42 "), fingerprint("the answer is 42"));
        assert_ne!(fingerprint("the answer is 42"), fingerprint("the answer is 43"));
        assert_ne!(fingerprint("ab"), fingerprint("a b"));
        assert_eq!(fingerprint("").to_string().len(), 16);
    }

    #[test]
    fn the_default_threshold_is_above_what_one_bad_sample_can_show() {
        let p = Params::default();
        assert!(p.single_sample_bound() < p.eject_above, "{}", p.single_sample_bound());
    }

    #[test]
    fn a_fingerprint_is_learnt_from_a_majority_of_agreeing_answers() {
        let mut m = Machine::new(Params::default());
        assert_eq!(answer(&mut m, "a", 7, 1).judgement, Judgement::Unjudged);
        assert_eq!(answer(&mut m, "b", 9, 2).judgement, Judgement::Unjudged, "garbage");
        assert_eq!(answer(&mut m, "c", 7, 3).learnt, None, "two agree: not yet a quorum");
        let o = answer(&mut m, "d", 7, 4);
        assert_eq!(o.learnt, Some(Fingerprint(7)));
        assert_eq!(o.judgement, Judgement::Correct);
        assert_eq!(m.expected("m", "v1"), Some((Fingerprint(7), Basis::Learnt)));
        assert_eq!(m.status("a", "m", s(4)).unwrap().state, "correct");
        assert_eq!(m.status("b", "m", s(4)).unwrap().state, "suspect", "judged retroactively");
        // Another version learns on its own.
        assert_eq!(m.expected("m", "v2"), None);
    }

    #[test]
    fn random_garbage_never_makes_a_fingerprint_and_learning_gives_up() {
        let p = Params { learn_max_answers: 10, ..Params::default() };
        let mut m = Machine::new(p);
        for i in 0..20 {
            let o = answer(&mut m, "a", 100 + i, i);
            assert_eq!(o.judgement, Judgement::Unjudged);
            assert!(o.changed.is_empty());
        }
        assert_eq!(m.expected("m", "v1"), None);
        assert_eq!(m.status("a", "m", s(20)).unwrap().state, "no_consensus");
    }

    #[test]
    fn a_garbage_node_learnt_against_is_ejected_at_once_when_the_fingerprint_is_learnt() {
        let mut m = Machine::new(Params::default());
        // The garbage node answered (the same garbage) twice during learning.
        answer(&mut m, "bad", 5, 1);
        answer(&mut m, "bad", 5, 2);
        answer(&mut m, "a", 7, 3);
        answer(&mut m, "b", 7, 4);
        assert!(!m.is_ejected("bad", "m"));
        let o = answer(&mut m, "c", 7, 5);
        assert_eq!(o.learnt, Some(Fingerprint(7)));
        assert_eq!(o.changed, vec![("bad".to_owned(), "m".to_owned())]);
        assert!(m.is_ejected("bad", "m"));
    }

    #[test]
    fn a_single_wrong_answer_never_ejects() {
        let mut m = pinned();
        let o = answer(&mut m, "a", 2, 1);
        assert_eq!(o.judgement, Judgement::Wrong);
        assert!(o.changed.is_empty() && !m.is_ejected("a", "m"));
        assert_eq!(m.status("a", "m", s(1)).unwrap().state, "suspect");
        for t in 2..10 {
            answer(&mut m, "a", 1, t);
        }
        answer(&mut m, "a", 2, 10);
        assert!(!m.is_ejected("a", "m"));
    }

    #[test]
    fn a_consistently_wrong_node_is_ejected_on_its_second_bad_probe_and_errors_count() {
        let mut m = pinned();
        answer(&mut m, "a", 2, 1);
        let o = answer(&mut m, "a", 3, 2);
        assert_eq!(o.changed, vec![("a".to_owned(), "m".to_owned())]);
        let st = m.status("a", "m", s(5)).unwrap();
        assert_eq!((st.state, st.bad, st.judged, st.ejected_for_ms), ("ejected", 2, 2, Some(3000)));
        assert!(
            st.bad_rate_lower > 0.3 && st.reason.as_deref().unwrap().contains("2 of the last 2")
        );
        // 5xx answers are bad answers too; unavailability is not judged.
        let mut m = pinned();
        for t in 0..10 {
            let o = m.observe("b", "m", "v1", Outcome::Unavailable("503".into()), ms(1), s(t));
            assert_eq!(o.judgement, Judgement::Unavailable);
        }
        assert!(!m.is_ejected("b", "m"));
        m.observe("b", "m", "v1", Outcome::Error("HTTP 500".into()), ms(1), s(11));
        m.observe("b", "m", "v1", Outcome::Error("HTTP 500".into()), ms(1), s(12));
        assert!(m.is_ejected("b", "m"));
    }

    #[test]
    fn an_ejected_node_rejoins_only_after_the_run_of_correct_answers() {
        let mut m = pinned();
        answer(&mut m, "a", 2, 1);
        answer(&mut m, "a", 2, 2);
        assert!(m.is_ejected("a", "m"));
        answer(&mut m, "a", 1, 3);
        answer(&mut m, "a", 1, 4);
        assert_eq!(m.status("a", "m", s(4)).unwrap().state, "recovering");
        answer(&mut m, "a", 2, 5);
        assert_eq!(m.status("a", "m", s(5)).unwrap().recovery_run, Some(0), "restarted");
        answer(&mut m, "a", 1, 6);
        answer(&mut m, "a", 1, 7);
        assert!(m.is_ejected("a", "m"));
        let o = answer(&mut m, "a", 1, 8);
        assert_eq!(o.changed, vec![("a".to_owned(), "m".to_owned())]);
        assert!(!m.is_ejected("a", "m"));
        let st = m.status("a", "m", s(8)).unwrap();
        assert_eq!((st.state, st.bad, st.judged), ("correct", 0, 3));
        // Back to normal: one bad answer does not eject it again.
        answer(&mut m, "a", 2, 9);
        assert!(!m.is_ejected("a", "m"));
    }

    #[test]
    fn a_new_version_is_judged_afresh() {
        let mut m = pinned();
        answer(&mut m, "a", 2, 1);
        answer(&mut m, "a", 2, 2);
        assert!(m.is_ejected("a", "m"));
        let o = m.observe("a", "m", "v2", Outcome::Answer(Fingerprint(2)), ms(1), s(3));
        assert_eq!(o.judgement, Judgement::Unjudged);
        assert_eq!(o.changed, vec![("a".to_owned(), "m".to_owned())]);
        assert!(!m.is_ejected("a", "m"));
    }

    #[test]
    fn latency_p50_is_over_the_window_and_nodes_are_forgotten() {
        let mut m = pinned();
        for (t, l) in [10, 30, 20, 1000, 25].into_iter().enumerate() {
            m.observe("a", "m", "v1", Outcome::Answer(GOOD), ms(l), s(t as u64));
        }
        assert_eq!(m.status("a", "m", s(9)).unwrap().latency_p50_ms, Some(25));
        m.observe("b", "m", "v1", Outcome::Answer(GOOD), ms(1), s(9));
        m.observe("a", "n", "v1", Outcome::Answer(GOOD), ms(1), s(9));
        assert_eq!(m.models_of("a"), ["m", "n"]);
        assert_eq!(m.nodes().collect::<Vec<_>>(), ["a", "b"]);
        m.forget("a", Some("m"));
        assert!(m.status("a", "m", s(9)).is_none());
        assert_eq!(m.models_of("a"), ["n"]);
        m.forget("a", None);
        assert_eq!(m.nodes().collect::<Vec<_>>(), ["b"]);
    }

    fn outcome() -> impl Strategy<Value = Outcome> {
        prop_oneof![
            4 => Just(Outcome::Answer(GOOD)),
            2 => (2u64..5).prop_map(|f| Outcome::Answer(Fingerprint(f))),
            1 => Just(Outcome::Error("HTTP 500".into())),
            1 => Just(Outcome::Unavailable("connect".into())),
        ]
    }

    proptest! {
        /// Whatever came before, a window with exactly one bad result is never ejected.
        #[test]
        fn one_bad_result_in_the_window_never_ejects(
            goods in 0usize..40, at in 0usize..40,
        ) {
            let mut m = pinned();
            let at = at.min(goods);
            for i in 0..=goods {
                let fp = if i == at { 9 } else { 1 };
                answer(&mut m, "a", fp, i as u64);
                prop_assert!(!m.is_ejected("a", "m"));
            }
        }

        /// A node answering wrong every time is ejected within two probes, whatever its
        /// history of correct answers (once the bad ones fill enough of the window).
        #[test]
        fn a_consistently_wrong_node_is_ejected_within_k_probes(goods in 0usize..60) {
            let p = Params::default();
            let mut m = pinned();
            for i in 0..goods {
                answer(&mut m, "a", 1, i as u64);
            }
            let k = p.window + 2;
            let mut ejected_after = None;
            for j in 0..k {
                answer(&mut m, "a", 7, (goods + j) as u64);
                if m.is_ejected("a", "m") {
                    ejected_after = Some(j + 1);
                    break;
                }
            }
            let after = ejected_after.expect("ejected");
            if goods == 0 { prop_assert_eq!(after, 2); }
            prop_assert!(after <= k);
        }

        /// An ejected node is readmitted exactly when it has answered `recover_after`
        /// correct answers in a row, and never otherwise.
        #[test]
        fn rejoining_needs_the_run(outcomes in proptest::collection::vec(outcome(), 1..80)) {
            let p = Params::default();
            let mut m = pinned();
            let mut ejected = false;
            let mut run = 0u32;
            for (t, o) in outcomes.into_iter().enumerate() {
                let judged_correct = o == Outcome::Answer(GOOD);
                let bad = matches!(o, Outcome::Error(_))
                    || matches!(o, Outcome::Answer(f) if f != GOOD);
                let obs = m.observe("a", "m", "v1", o, ms(5), s(t as u64));
                let now = m.is_ejected("a", "m");
                if ejected {
                    if judged_correct { run += 1 } else if bad { run = 0 }
                    if run >= p.recover_after {
                        prop_assert!(!now, "rejoins after the run");
                        run = 0;
                    } else {
                        prop_assert!(now, "still ejected without the run");
                    }
                } else if now {
                    prop_assert!(bad, "only a bad result ejects");
                    run = 0;
                }
                prop_assert_eq!(obs.changed.is_empty(), ejected == now);
                ejected = now;
            }
        }
    }
}
