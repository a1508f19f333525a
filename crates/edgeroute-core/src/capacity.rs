//! GPU capacity: how available a GPU, a model or a multi-model pipeline is, and whether a new
//! model fits in a GPU's memory.
//!
//! A voice pipeline needs STT, LLM and TTS models, often pinned to different GPUs; it is only
//! as available as the busiest GPU it needs. Availability here is the share of a GPU's slots
//! free for new work (queued requests count against it), in [0, 1].

use std::collections::BTreeMap;

/// What the node knows of one GPU right now.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuLoad {
    pub id: String,
    pub slots: u32,
    pub busy: u32,
    pub queued: u32,
    pub memory_used_mb: u64,
    pub memory_total_mb: u64,
}

impl GpuLoad {
    /// Free share of the GPU's slots after queued work, in [0, 1].
    pub fn availability(&self) -> f64 {
        if self.slots == 0 {
            return 0.0;
        }
        let taken = u64::from(self.busy) + u64::from(self.queued);
        let free = u64::from(self.slots).saturating_sub(taken);
        free as f64 / f64::from(self.slots)
    }

    pub fn memory_free_mb(&self) -> u64 {
        self.memory_total_mb.saturating_sub(self.memory_used_mb)
    }
}

/// A pipeline's availability and the GPU that limits it.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineAvailability {
    pub id: String,
    /// False when a model of the pipeline is not ready on this node.
    pub servable: bool,
    /// The least available GPU among those the pipeline's models are pinned to, in [0, 1];
    /// 0 when not servable.
    pub availability: f64,
    /// That GPU.
    pub bottleneck: Option<String>,
    /// Models of the pipeline that are not ready here.
    pub missing: Vec<String>,
}

/// Computes a pipeline's availability from where its models are pinned (`model → gpu`, ready
/// models only) and the GPUs' loads.
pub fn pipeline_availability(
    id: &str,
    models: &[String],
    ready_on: &BTreeMap<String, String>,
    gpus: &[GpuLoad],
) -> PipelineAvailability {
    let missing: Vec<String> =
        models.iter().filter(|m| !ready_on.contains_key(*m)).cloned().collect();
    if !missing.is_empty() || models.is_empty() {
        return PipelineAvailability {
            id: id.to_owned(),
            servable: false,
            availability: 0.0,
            bottleneck: None,
            missing,
        };
    }
    let mut worst: Option<(&GpuLoad, f64)> = None;
    for m in models {
        let Some(g) = ready_on.get(m).and_then(|gid| gpus.iter().find(|g| &g.id == gid)) else {
            return PipelineAvailability {
                id: id.to_owned(),
                servable: false,
                availability: 0.0,
                bottleneck: None,
                missing: vec![m.clone()],
            };
        };
        let a = g.availability();
        // Ties go to the GPU met first, so the answer is deterministic.
        if worst.is_none_or(|(_, w)| a < w) {
            worst = Some((g, a));
        }
    }
    let (g, a) = worst.map_or((None, 0.0), |(g, a)| (Some(g.id.clone()), a));
    PipelineAvailability {
        id: id.to_owned(),
        servable: true,
        availability: a,
        bottleneck: g,
        missing: vec![],
    }
}

/// Why a model cannot be placed on a GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlacementError {
    UnknownGpu(String),
    InsufficientMemory { gpu: String, needed_mb: u64, free_mb: u64 },
}

/// Checks that a model needing `memory_mb` fits on `gpu`.
pub fn check_fit(gpu: &str, memory_mb: u64, gpus: &[GpuLoad]) -> Result<(), PlacementError> {
    let g = gpus
        .iter()
        .find(|g| g.id == gpu)
        .ok_or_else(|| PlacementError::UnknownGpu(gpu.to_owned()))?;
    if memory_mb > g.memory_free_mb() {
        return Err(PlacementError::InsufficientMemory {
            gpu: gpu.to_owned(),
            needed_mb: memory_mb,
            free_mb: g.memory_free_mb(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(id: &str, slots: u32, busy: u32, queued: u32) -> GpuLoad {
        GpuLoad { id: id.into(), slots, busy, queued, memory_used_mb: 1000, memory_total_mb: 8000 }
    }

    #[test]
    fn availability_counts_queue_against_slots() {
        assert_eq!(gpu("g", 4, 1, 0).availability(), 0.75);
        assert_eq!(gpu("g", 4, 4, 3).availability(), 0.0);
        assert_eq!(gpu("g", 0, 0, 0).availability(), 0.0);
    }

    #[test]
    fn a_pipeline_is_as_available_as_its_busiest_gpu() {
        let gpus = vec![gpu("gpu0", 4, 0, 0), gpu("gpu1", 4, 3, 0), gpu("gpu2", 2, 0, 0)];
        let pins: BTreeMap<String, String> = [("stt", "gpu0"), ("llm", "gpu1"), ("tts", "gpu2")]
            .iter()
            .map(|(m, g)| (m.to_string(), g.to_string()))
            .collect();
        let voice: Vec<String> = ["stt", "llm", "tts"].iter().map(|s| s.to_string()).collect();
        let p = pipeline_availability("voice", &voice, &pins, &gpus);
        assert!(p.servable);
        assert_eq!(p.availability, 0.25);
        assert_eq!(p.bottleneck.as_deref(), Some("gpu1"));

        let mut partial = pins.clone();
        partial.remove("tts");
        let p = pipeline_availability("voice", &voice, &partial, &gpus);
        assert!(!p.servable);
        assert_eq!(p.missing, vec!["tts".to_owned()]);
    }

    #[test]
    fn placement_checks_gpu_and_memory() {
        let gpus = vec![gpu("gpu0", 4, 0, 0)];
        assert_eq!(check_fit("gpu0", 7000, &gpus), Ok(()));
        assert_eq!(
            check_fit("gpu0", 7001, &gpus),
            Err(PlacementError::InsufficientMemory {
                gpu: "gpu0".into(),
                needed_mb: 7001,
                free_mb: 7000
            })
        );
        assert_eq!(check_fit("gpu9", 1, &gpus), Err(PlacementError::UnknownGpu("gpu9".into())));
    }
}
