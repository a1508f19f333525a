//! The comparison's figures: one [`Row`] per scenario × strategy, rendered as markdown.

use super::world::NODES;
use super::{Run, Scenario, Strategy, TurnRecord};

/// A silence longer than this is dead air: the ~300 ms a caller waits before the gap in a
/// conversation is heard as one.
pub const DEAD_AIR_MS: f64 = 300.0;

/// TTFT buckets of the distribution tables, ms.
pub const BUCKETS: [(f64, f64); 6] = [
    (0.0, 25.0),
    (25.0, 50.0),
    (50.0, 100.0),
    (100.0, 200.0),
    (200.0, 400.0),
    (400.0, f64::INFINITY),
];

/// One strategy's figures in one scenario.
#[derive(Debug, Clone)]
pub struct Row {
    pub scenario: Scenario,
    pub strategy: Strategy,
    pub turns: usize,
    pub ttft_p50_ms: f64,
    pub ttft_p99_ms: f64,
    /// Mean routing overhead per request, ms (see [`TurnRecord::overhead_ms`]).
    pub overhead_mean_ms: f64,
    pub overhead_p99_ms: f64,
    /// Share of answered turns served by the site's truly best live node.
    pub best_share: f64,
    /// Requests that failed as the caller's code saw them.
    pub failed_requests: u32,
    /// Turns with no answer after every attempt.
    pub lost_turns: usize,
    /// Sum of the silences longer than [`DEAD_AIR_MS`], seconds.
    pub dead_air_s: f64,
    pub longest_silence_ms: f64,
    /// Turns served by the busiest live node over the mean of the live nodes.
    pub load_max_over_mean: f64,
    /// Turns served per node.
    pub per_node: [usize; NODES.len()],
    /// Every answered turn's TTFT, ms, sorted: the distribution the charts draw.
    pub ttft_ms: Vec<f64>,
}

/// The `q` quantile of `v` (nearest rank); 0 for none.
pub fn quantile(v: &[f64], q: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(((v.len() as f64 * q).ceil() as usize).saturating_sub(1)).copied().unwrap_or(0.0)
}

impl Row {
    pub fn new(scenario: Scenario, strategy: Strategy, run: &Run) -> Row {
        let records = &run.records;
        let mut ttft: Vec<f64> = records.iter().filter_map(|r| r.ttft_ms).collect();
        ttft.sort_by(f64::total_cmp);
        let overhead: Vec<f64> = records.iter().filter_map(|r| r.overhead_ms).collect();
        let answered: Vec<&TurnRecord> = records.iter().filter(|r| r.ok).collect();
        let on_best = answered.iter().filter(|r| r.node.is_some() && r.node == r.best).count();
        let mut per_node = [0usize; NODES.len()];
        for r in &answered {
            if let Some(n) = r.node {
                per_node[n] += 1;
            }
        }
        // Over the nodes alive at the end.
        let live: Vec<usize> =
            (0..NODES.len()).filter(|i| Some(*i) != run.victim).map(|i| per_node[i]).collect();
        let mean = live.iter().sum::<usize>() as f64 / live.len().max(1) as f64;
        let max = live.iter().copied().max().unwrap_or(0) as f64;
        Row {
            scenario,
            strategy,
            turns: records.len(),
            ttft_p50_ms: quantile(&ttft, 0.5),
            ttft_p99_ms: quantile(&ttft, 0.99),
            overhead_mean_ms: if overhead.is_empty() {
                0.0
            } else {
                overhead.iter().sum::<f64>() / overhead.len() as f64
            },
            overhead_p99_ms: quantile(&overhead, 0.99),
            best_share: on_best as f64 / answered.len().max(1) as f64,
            failed_requests: records.iter().map(|r| r.failed_attempts).sum(),
            lost_turns: records.iter().filter(|r| !r.ok).count(),
            dead_air_s: records
                .iter()
                .map(|r| r.longest_silence_ms)
                .filter(|s| *s > DEAD_AIR_MS)
                .fold(0.0, |a, s| a + s)
                / 1000.0,
            longest_silence_ms: records.iter().map(|r| r.longest_silence_ms).fold(0.0, f64::max),
            load_max_over_mean: if mean > 0.0 { max / mean } else { 0.0 },
            per_node,
            ttft_ms: ttft,
        }
    }
}

/// The rows of one scenario as a markdown table, with each strategy's p99 against the
/// oracle's (when the oracle ran).
pub fn to_markdown(rows: &[Row]) -> String {
    let mut out = String::new();
    let mut scenarios: Vec<Scenario> = Vec::new();
    for r in rows {
        if !scenarios.contains(&r.scenario) {
            scenarios.push(r.scenario);
        }
    }
    for s in scenarios {
        let these: Vec<&Row> = rows.iter().filter(|r| r.scenario == s).collect();
        let oracle = these.iter().find(|r| r.strategy == Strategy::Oracle).map(|r| r.ttft_p99_ms);
        out.push_str(&format!("**{}**\n\n", s.name()));
        out.push_str(
            "| strategy | turns | TTFT p50 (ms) | TTFT p99 (ms) | p99 / oracle | routing overhead mean / p99 (ms) | on best node | failed requests | lost turns | dead air (s) | longest silence (ms) | load max/mean |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        for r in these {
            let ratio = oracle
                .filter(|o| *o > 0.0)
                .map_or("–".to_owned(), |o| format!("{:.2}", r.ttft_p99_ms / o));
            out.push_str(&format!(
                "| {} | {} | {:.1} | {:.1} | {ratio} | {:.1} / {:.1} | {:.0} % | {} | {} | {:.1} | {:.0} | {:.2} |\n",
                r.strategy.name(),
                r.turns,
                r.ttft_p50_ms,
                r.ttft_p99_ms,
                r.overhead_mean_ms,
                r.overhead_p99_ms,
                r.best_share * 100.0,
                r.failed_requests,
                r.lost_turns,
                r.dead_air_s,
                r.longest_silence_ms,
                r.load_max_over_mean,
            ));
        }
        out.push('\n');
    }
    out
}

/// Writes `dir/ttft-<scenario>.png` per scenario (TTFT percentile curves, a line per
/// strategy) and `dir/fleet.md` (the tables, the targets, and the charts).
pub fn write(dir: &std::path::Path, header: &str, rows: &[Row]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut md = format!("{header}\n\n{}", to_markdown(rows));
    for (what, met) in targets(rows) {
        md.push_str(&format!("- {} {what}\n", if met { "met:" } else { "MISSED:" }));
    }
    for s in Scenario::ALL {
        let these: Vec<&Row> = rows.iter().filter(|r| r.scenario == s).collect();
        if these.is_empty() {
            continue;
        }
        let series: Vec<crate::chart::Series> = these
            .iter()
            .map(|r| crate::chart::Series {
                name: r.strategy.name().to_owned(),
                ttft_ms: r.ttft_ms.clone(),
            })
            .collect();
        let file = format!("ttft-{}.png", s.name().replace(' ', "-").to_lowercase());
        crate::chart::ttft_percentiles(&format!("Time to first token, {}", s.name()), &series)?
            .save(&dir.join(&file))?;
        md.push_str(&format!(
            "\n### TTFT distribution, {}\n\n![TTFT, {}]({file})\n\n*Share of turns (y, as a \
             percentile, the tail stretched) answered within a time to first token (x, ms, log \
             scale), a line per strategy; further left is faster.*\n",
            s.name(),
            s.name(),
        ));
    }
    std::fs::write(dir.join("fleet.md"), md)
}

/// The targets, checked on the rows: edgeroute's p99 within 10 % of the oracle's and below
/// DNS-style and central proxy's in every scenario; no failed request and no silence of a
/// second or more across a node death. One line per check.
pub fn targets(rows: &[Row]) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    let find =
        |s: Scenario, st: Strategy| rows.iter().find(|r| r.scenario == s && r.strategy == st);
    for s in Scenario::ALL {
        let Some(e) = find(s, Strategy::Edgeroute) else { continue };
        if let Some(o) = find(s, Strategy::Oracle) {
            out.push((
                format!(
                    "{}: edgeroute p99 {:.1} ms within 10 % of the oracle's {:.1} ms",
                    s.name(),
                    e.ttft_p99_ms,
                    o.ttft_p99_ms
                ),
                e.ttft_p99_ms <= o.ttft_p99_ms * 1.10,
            ));
        }
        for other in [Strategy::Dns, Strategy::Central] {
            if let Some(b) = find(s, other) {
                out.push((
                    format!(
                        "{}: edgeroute p99 {:.1} ms below {}'s {:.1} ms",
                        s.name(),
                        e.ttft_p99_ms,
                        other.name(),
                        b.ttft_p99_ms
                    ),
                    e.ttft_p99_ms < b.ttft_p99_ms,
                ));
            }
        }
        if let Some(d) = find(s, Strategy::EdgerouteDns) {
            out.push((
                format!(
                    "{}: edgeroute with DNS bootstrap p99 {:.1} ms no worse than hand-configured {:.1} ms (+5 % noise)",
                    s.name(),
                    d.ttft_p99_ms,
                    e.ttft_p99_ms
                ),
                d.ttft_p99_ms <= e.ttft_p99_ms * 1.05,
            ));
        }
        if matches!(s, Scenario::NodeDeath | Scenario::ModelUnload) {
            out.push((
                format!(
                    "{}: edgeroute failed requests {}, lost turns {} (target 0)",
                    s.name(),
                    e.failed_requests,
                    e.lost_turns
                ),
                e.failed_requests == 0 && e.lost_turns == 0,
            ));
        }
        if s == Scenario::NodeDeath {
            out.push((
                format!(
                    "node death: edgeroute longest silence {:.0} ms (target < 1 s)",
                    e.longest_silence_ms
                ),
                e.longest_silence_ms < 1000.0,
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(node: usize, best: usize, ttft: f64, silence: f64, failed: u32, ok: bool) -> TurnRecord {
        TurnRecord {
            session: 0,
            turn: 0,
            site: "toronto",
            start: std::time::Duration::ZERO,
            ttft_ms: Some(ttft),
            node: Some(node),
            failed_attempts: failed,
            ok,
            longest_silence_ms: silence,
            overhead_ms: Some(1.0),
            best: Some(best),
        }
    }

    #[test]
    fn figures_come_from_the_records() {
        let mut records: Vec<TurnRecord> =
            (0..98).map(|k| rec(k % 6, 2, 10.0 + k as f64, 50.0, 0, true)).collect();
        records.push(rec(2, 2, 500.0, 1200.0, 1, true));
        records.push(rec(2, 2, 900.0, 700.0, 4, false));
        let r = Row::new(Scenario::NodeDeath, Strategy::Dns, &Run { records, victim: Some(2) });
        assert_eq!(r.turns, 100);
        assert_eq!(r.ttft_p50_ms, 59.0);
        assert_eq!(r.ttft_p99_ms, 500.0);
        assert_eq!(r.failed_requests, 5);
        assert_eq!(r.lost_turns, 1);
        assert!((r.dead_air_s - 1.9).abs() < 1e-9, "{}", r.dead_air_s);
        assert_eq!(r.longest_silence_ms, 1200.0);
        // 98 + 1 answered; on node 2 (the best): 16 + 1.
        assert!((r.best_share - 17.0 / 99.0).abs() < 1e-9, "{}", r.best_share);
        // tor-1 died: the live nodes served 17, 17, 16, 16, 16 → max/mean = 17 / 16.4.
        assert!((r.load_max_over_mean - 17.0 / 16.4).abs() < 1e-9, "{}", r.load_max_over_mean);
        let md = to_markdown(std::slice::from_ref(&r));
        assert!(md.contains("**node death**"), "{md}");
        assert!(md.contains("| DNS-style (geo map, 30 s TTL) | 100 | 59.0 | 500.0 | – |"), "{md}");
    }

    #[test]
    fn the_report_is_written_with_a_chart_per_scenario() {
        let run = Run {
            records: vec![rec(2, 2, 20.0, 30.0, 0, true), rec(3, 2, 420.0, 30.0, 0, true)],
            victim: None,
        };
        let rows = vec![
            Row::new(Scenario::Steady, Strategy::Edgeroute, &run),
            Row::new(Scenario::Steady, Strategy::Oracle, &run),
        ];
        assert_eq!(rows[0].ttft_ms, [20.0, 420.0]);
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        write(dir.path(), "# fleet", &rows).unwrap_or_else(|e| panic!("{e}"));
        let md = std::fs::read_to_string(dir.path().join("fleet.md")).unwrap_or_default();
        assert!(md.starts_with("# fleet\n"), "{md}");
        assert!(md.contains("![TTFT, steady](ttft-steady.png)"), "{md}");
        assert!(md.contains("a line per strategy"), "{md}");
        assert!(
            md.contains(
                "- MISSED: steady: edgeroute p99 420.0 ms within 10 % of the oracle's 420.0 ms"
            ) || md.contains("- met: steady"),
            "{md}"
        );
        let png = std::fs::read(dir.path().join("ttft-steady.png")).unwrap_or_default();
        assert_eq!(&png[..4], b"\x89PNG");
        let info = png::Decoder::new(png.as_slice()).read_info().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(info.info().width, crate::chart::WIDTH);
    }

    #[test]
    fn targets_are_checked_against_the_oracle_and_the_baselines() {
        let good = Run { records: vec![rec(2, 2, 20.0, 30.0, 0, true)], victim: None };
        let slow = Run { records: vec![rec(2, 2, 40.0, 30.0, 0, true)], victim: None };
        let rows = vec![
            Row::new(Scenario::NodeDeath, Strategy::Edgeroute, &good),
            Row::new(Scenario::NodeDeath, Strategy::Oracle, &good),
            Row::new(Scenario::NodeDeath, Strategy::Dns, &slow),
        ];
        let t = targets(&rows);
        assert_eq!(t.len(), 4, "{t:?}");
        assert!(t.iter().all(|(_, ok)| *ok), "{t:?}");
        let rows = vec![
            Row::new(Scenario::Steady, Strategy::Edgeroute, &slow),
            Row::new(Scenario::Steady, Strategy::Oracle, &good),
        ];
        assert_eq!(
            targets(&rows),
            vec![(
                "steady: edgeroute p99 40.0 ms within 10 % of the oracle's 20.0 ms".to_owned(),
                false
            )]
        );
    }
}
