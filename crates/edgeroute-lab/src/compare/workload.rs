//! The workload: voice-agent sessions, generated up front from a seed so every strategy
//! serves exactly the same callers, at the same moments, saying the same things.
//!
//! Sessions arrive as a Poisson process; each comes from a site drawn by weight, and holds a
//! few turns separated by the caller's think time (the agent speaks, the caller answers).
//! Each turn is one streamed LLM answer: the part of a voice turn routing decides (STT and
//! TTS run on the same pinned node or next to it).

use std::time::Duration;

use rand::{Rng as _, SeedableRng as _};

/// One caller's session.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionPlan {
    pub id: usize,
    /// Since the run started.
    pub start: Duration,
    /// The site's name (see [`super::world::SITES`]).
    pub site: &'static str,
    pub turns: Vec<TurnPlan>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TurnPlan {
    /// The caller's silence before this turn (zero for the first).
    pub think: Duration,
    pub prompt: &'static str,
    pub max_tokens: u32,
}

/// The shape of a workload.
#[derive(Debug, Clone)]
pub struct WorkloadSpec {
    /// New sessions per second (mean of a Poisson process).
    pub sessions_per_s: f64,
    /// Sessions arrive during this long.
    pub duration: Duration,
    pub turns: usize,
    /// Think time between turns: uniform in this range.
    pub think: (Duration, Duration),
    /// Sites and their weights.
    pub sites: Vec<(&'static str, f64)>,
    pub max_tokens: u32,
}

const PROMPTS: [&str; 6] = [
    "What's the weather like this afternoon?",
    "Book me a table for two tomorrow at seven.",
    "Translate 'good morning' into French.",
    "How long is the drive from Toronto to Montreal?",
    "Remind me to call the dentist on Monday.",
    "What time does the pharmacy close tonight?",
];

impl WorkloadSpec {
    /// The sessions, in arrival order. Same spec and seed: same sessions.
    pub fn generate(&self, seed: u64) -> Vec<SessionPlan> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let total: f64 = self.sites.iter().map(|(_, w)| w.max(0.0)).sum();
        let mut out = Vec::new();
        let mut t = 0.0f64;
        if self.sessions_per_s <= 0.0 || total <= 0.0 {
            return out;
        }
        loop {
            // Exponential gaps: a Poisson process.
            let u: f64 = rng.random_range(f64::EPSILON..1.0);
            t += -u.ln() / self.sessions_per_s;
            if t >= self.duration.as_secs_f64() {
                return out;
            }
            let mut pick = rng.random_range(0.0..total);
            let mut site = self.sites[0].0;
            for (name, w) in &self.sites {
                if pick < w.max(0.0) {
                    site = name;
                    break;
                }
                pick -= w.max(0.0);
            }
            let lo = self.think.0.as_secs_f64();
            let hi = self.think.1.as_secs_f64().max(lo);
            let turns = (0..self.turns)
                .map(|k| TurnPlan {
                    think: if k == 0 {
                        Duration::ZERO
                    } else {
                        Duration::from_secs_f64(rng.random_range(lo..=hi))
                    },
                    prompt: PROMPTS[rng.random_range(0..PROMPTS.len())],
                    max_tokens: self.max_tokens,
                })
                .collect();
            out.push(SessionPlan { id: out.len(), start: Duration::from_secs_f64(t), site, turns });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> WorkloadSpec {
        WorkloadSpec {
            sessions_per_s: 20.0,
            duration: Duration::from_secs(100),
            turns: 4,
            think: (Duration::from_millis(500), Duration::from_millis(1500)),
            sites: vec![("toronto", 3.0), ("montreal", 1.0)],
            max_tokens: 24,
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_sessions_and_another_seed_others() {
        let s = spec();
        assert_eq!(s.generate(1), s.generate(1));
        assert_ne!(s.generate(1), s.generate(2));
    }

    #[test]
    fn arrivals_rates_and_site_weights_are_as_specified() {
        let plans = spec().generate(9);
        // 2,000 expected; a Poisson count's standard deviation is ~45.
        assert!((1800..2200).contains(&plans.len()), "{}", plans.len());
        assert!(plans.windows(2).all(|w| w[0].start <= w[1].start), "in arrival order");
        assert!(plans.iter().all(|p| p.start < Duration::from_secs(100)));
        let tor = plans.iter().filter(|p| p.site == "toronto").count() as f64;
        let share = tor / plans.len() as f64;
        assert!((0.70..0.80).contains(&share), "toronto share {share}");
        for p in &plans {
            assert_eq!(p.turns.len(), 4);
            assert_eq!(p.turns[0].think, Duration::ZERO);
            for t in &p.turns[1..] {
                assert!(
                    t.think >= Duration::from_millis(500) && t.think <= Duration::from_millis(1500)
                );
            }
        }
        // Exponential gaps: their mean is 1/rate, and about 63 % are shorter than it.
        let gaps: Vec<f64> =
            plans.windows(2).map(|w| (w[1].start - w[0].start).as_secs_f64()).collect();
        let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
        assert!((0.045..0.055).contains(&mean), "mean gap {mean}");
        let short = gaps.iter().filter(|g| **g < 0.05).count() as f64 / gaps.len() as f64;
        assert!((0.58..0.68).contains(&short), "share of gaps under the mean {short}");
    }

    #[test]
    fn no_rate_or_no_site_is_no_sessions() {
        let mut s = spec();
        s.sessions_per_s = 0.0;
        assert!(s.generate(1).is_empty());
        let mut s = spec();
        s.sites = vec![("toronto", 0.0)];
        assert!(s.generate(1).is_empty());
    }
}
