//! Synthetic fleets for discovery's benchmarks and load tests (`edgeroute-lab bench discover`,
//! the `rescore` criterion bench): deterministic, realistic in shape (three regions, a handful
//! of models per node, a voice pipeline on some, a few nodes degraded, saturated, draining or
//! down).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use edgeroute_core::health::HealthParams;
use edgeroute_core::score::{Health, NodeView};
use edgeroute_discovery::config::StaticNode;
use edgeroute_discovery::fleet::{
    Fleet, NodeDetail, NodeEntry, NodeInfo, Source, ViewParams, health_name,
};
use edgeroute_proto::health::{ModelHealth, NodeHealth, NodeStatus, Percentiles, PipelineHealth};
use edgeroute_proto::models::ModelState;

pub const REGIONS: [&str; 3] = ["vancouver", "toronto", "montreal"];
pub const MODELS: [&str; 6] =
    ["llama-3.1-8b", "qwen2.5-7b", "whisper-small", "kokoro-tts", "mistral-7b", "phi-3-mini"];

/// `n` nodes, sorted by id, deterministic for `seed`.
pub fn fleet(n: usize, seed: u64) -> Vec<Arc<NodeEntry>> {
    let mut x = seed | 1;
    let mut next = move || {
        // xorshift64*
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let mut out: Vec<NodeEntry> = (0..n)
        .map(|i| {
            let region = REGIONS[i % REGIONS.len()];
            let id = format!("{}-{i:05}", &region[..3]);
            let mut models = BTreeSet::new();
            models.insert(MODELS[(next() % 2) as usize].to_owned());
            for m in MODELS.iter().skip(2) {
                if next() % 3 == 0 {
                    models.insert((*m).to_owned());
                }
            }
            let mut pipelines = BTreeMap::new();
            if models.contains("whisper-small") && models.contains("kokoro-tts") {
                pipelines.insert("voice".to_owned(), (next() % 100) as f64 / 100.0);
            }
            let health = match next() % 50 {
                0 => Health::Unhealthy,
                1 => Health::Draining,
                2 | 3 => Health::Degraded,
                4..=7 => Health::Saturated,
                _ => Health::Ready,
            };
            let capacity = 8 + (next() % 4) as u32 * 8;
            let queue_depth = (next() % 12) as u32;
            let p50 = 20.0 + (next() % 200) as f64;
            let view = NodeView {
                id: id.clone(),
                region: region.to_owned(),
                health,
                models: models.clone(),
                pipelines: pipelines.clone(),
                queue_depth,
                in_flight: queue_depth.min(capacity),
                capacity,
                ttft_p50_ms: p50,
                ttft_p99_ms: p50 * 2.5,
                error_rate: (next() % 20) as f64 / 1000.0,
                cost_per_1k: (next() % 50) as f64 / 100.0,
            };
            let info = NodeInfo {
                id: id.clone(),
                region: region.to_owned(),
                url: format!("http://10.{}.{}.{}:8080", i / 65536, (i / 256) % 256, i % 256),
                health: health_name(health),
                health_reason: None,
                models: models.iter().cloned().collect(),
                queue_depth,
                in_flight: view.in_flight,
                capacity,
                ttft_p50_ms: p50,
                ttft_p99_ms: view.ttft_p99_ms,
                ttft_estimated: false,
                error_rate: view.error_rate,
                cost_per_1k: view.cost_per_1k,
                pipelines,
                detail: NodeDetail {
                    placement_source: Source::Bus,
                    configured: false,
                    model_states: models.iter().map(|m| (m.clone(), ModelState::Ready)).collect(),
                    model_versions: Default::default(),
                    hardware: None,
                    gpu_util: 0.0,
                    phi: 0.5,
                    last_probe_age_ms: Some(400),
                    probes: Default::default(),
                    bus_liveness: None,
                },
            };
            NodeEntry { view, info }
        })
        .collect();
    out.sort_by(|a, b| a.view.id.cmp(&b.view.id));
    out.into_iter().map(Arc::new).collect()
}

/// A healthy node's `/health` report with `models` ready: the starting point of test reports.
pub fn health(id: &str, region: &str, models: &[&str]) -> NodeHealth {
    NodeHealth {
        status: NodeStatus::Ready,
        ready: true,
        node_id: id.into(),
        region: region.into(),
        version: "synthetic".into(),
        uptime_s: 1,
        models: models
            .iter()
            .map(|m| ModelHealth {
                id: (*m).into(),
                state: ModelState::Ready,
                gpu: None,
                version: None,
            })
            .collect(),
        gpus: vec![],
        pipelines: vec![],
        queue_depth: 0,
        in_flight: 0,
        capacity: 8,
        window_s: 60,
        ttft_ms: Percentiles { p50: 40.0, p99: 90.0, samples: 100 },
        latency_ms: Percentiles::default(),
        error_rate: 0.0,
        requests_in_window: 100,
        drain: None,
        cost_per_1k: None,
        hardware: None,
    }
}

/// The node's `/health` report that would produce `e` (for registry benchmarks).
pub fn report(e: &NodeEntry) -> NodeHealth {
    let v = &e.view;
    NodeHealth {
        status: match v.health {
            edgeroute_core::score::Health::Saturated => NodeStatus::Saturated,
            edgeroute_core::score::Health::Draining => NodeStatus::Draining,
            _ => NodeStatus::Ready,
        },
        ready: true,
        node_id: v.id.clone(),
        region: v.region.clone(),
        version: "synthetic".into(),
        uptime_s: 1,
        models: v
            .models
            .iter()
            .map(|m| ModelHealth {
                id: m.clone(),
                state: ModelState::Ready,
                gpu: None,
                version: None,
            })
            .collect(),
        gpus: vec![],
        pipelines: v
            .pipelines
            .iter()
            .map(|(id, avail)| PipelineHealth {
                id: id.clone(),
                models: vec!["whisper-small".into(), "kokoro-tts".into()],
                servable: true,
                availability: *avail,
                bottleneck_gpu: None,
                missing: vec![],
            })
            .collect(),
        queue_depth: v.queue_depth,
        in_flight: v.in_flight,
        capacity: v.capacity,
        window_s: 60,
        ttft_ms: Percentiles { p50: v.ttft_p50_ms, p99: v.ttft_p99_ms, samples: 100 },
        latency_ms: Percentiles::default(),
        error_rate: v.error_rate,
        requests_in_window: 1000,
        drain: None,
        cost_per_1k: Some(v.cost_per_1k),
        hardware: None,
    }
}

/// A registry of `n` configured nodes, each verified by two answered probes; returns it with
/// the time of the last probe.
pub fn registry(n: usize, seed: u64) -> (Fleet, Duration) {
    let mut f = Fleet::new(HealthParams::default(), Duration::from_secs(600));
    let entries = fleet(n, seed);
    for e in &entries {
        let node = StaticNode {
            id: e.view.id.clone(),
            url: e.info.url.clone(),
            region: e.view.region.clone(),
            cost_per_1k: None,
            jurisdiction: None,
        };
        f.add_static(&node, Duration::ZERO);
        for t in [1000, 2000] {
            let at = Duration::from_millis(t);
            f.probe_ok(&e.view.id, at, at, report(e));
        }
    }
    (f, Duration::from_millis(2000))
}

/// The view parameters discovery uses by default.
pub const VIEW_PARAMS: ViewParams = ViewParams { unknown_ttft_ms: 250.0, min_ttft_samples: 5 };

/// A routing policy of `rules` rules for the synthetic fleet, the shape an operator's would
/// have: the regions in one jurisdiction, every model registered (two versions of the first),
/// `rules - 1` per-tenant rules that an anonymous benchmark request passes over (each is
/// matched and skipped: the cost of a long policy), and a last rule for every tenant with a
/// 95/5 canary, thresholds on TTFT, queue and error rate, and a cascade to the second model.
pub fn policy(rules: usize) -> String {
    use std::fmt::Write as _;
    let rules = rules.max(1);
    let mut p = String::from("version = \"bench-1\"\n\n[jurisdictions]\nca = [");
    p.push_str(&REGIONS.map(|r| format!("\"{r}\"")).join(", "));
    p.push_str("]\n");
    for (i, m) in MODELS.iter().enumerate() {
        let _ = write!(p, "\n[[models]]\nname = \"{m}\"\n[[models.versions]]\nid = \"v1\"\n");
        if i == 0 {
            p.push_str("[[models.versions]]\nid = \"v2\"\n");
        }
    }
    for t in 0..rules - 1 {
        let _ = write!(
            p,
            "\n[[rules]]\nid = \"tenant-{t}\"\nmatch.tenants = [\"tenant-{t}\"]\n\
             match.models = [\"{}\"]\nconstraints.regions = [\"{}\"]\n",
            MODELS[t % MODELS.len()],
            REGIONS[t % REGIONS.len()]
        );
    }
    let _ = write!(
        p,
        "\n[[rules]]\nid = \"canary\"\nmatch.models = [\"{}\"]\nversions = {{ v1 = 95, v2 = 5 }}\n\
         cascade = [\"{}\"]\nconstraints.below = {{ ttft_p99_ms = 600.0, queue = 10, error_rate = 0.05 }}\n",
        MODELS[0], MODELS[1]
    );
    p
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_bench_policy_is_valid_at_every_size() {
        for n in [1, 2, 50, 200] {
            let text = super::policy(n);
            let p = edgeroute_policy::Policy::parse(&text)
                .unwrap_or_else(|e| panic!("{n} rules: {e}\n{text}"));
            assert_eq!(p.rule_ids().len(), n);
        }
    }
}
