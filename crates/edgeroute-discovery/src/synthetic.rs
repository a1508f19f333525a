//! Synthetic fleets for benchmarks and load tests: deterministic, realistic in shape (three
//! regions, a handful of models per node, a voice pipeline on some, a few nodes degraded,
//! saturated, draining or down).

use std::collections::{BTreeMap, BTreeSet};

use edgeroute_core::score::{Health, NodeView};
use edgeroute_proto::models::ModelState;

use crate::fleet::{NodeDetail, NodeEntry, NodeInfo, Source, health_name};

pub const REGIONS: [&str; 3] = ["vancouver", "toronto", "montreal"];
pub const MODELS: [&str; 6] =
    ["llama-3.1-8b", "qwen2.5-7b", "whisper-small", "kokoro-tts", "mistral-7b", "phi-3-mini"];

/// `n` nodes, sorted by id, deterministic for `seed`.
pub fn fleet(n: usize, seed: u64) -> Vec<NodeEntry> {
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
    out
}
