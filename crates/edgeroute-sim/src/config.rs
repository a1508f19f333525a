//! The simulator's configuration: timing, GPUs, models and initial faults.
//!
//! A plain serde struct that comes in from outside (the node's config file, a lab scenario,
//! a test); this crate never reads files or the environment. Unknown keys are errors so a
//! typo in a scenario fails loudly instead of silently simulating something else. Every key
//! has a default, so `{}` is a complete config: one `gpu0` with 4 slots serving `sim-llama`.

use serde::{Deserialize, Serialize};

/// The whole simulator. See each field for its default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimConfig {
    /// Seed for answers and fault rolls. Default `0`.
    pub seed: u64,
    /// Fixed part of the time to first token, after the request gets a slot. Default `40`.
    pub ttft_base_ms: u64,
    /// Prefill cost per prompt token, added to the time to first token. Default `200`.
    pub prefill_us_per_token: u64,
    /// Decode speed. `0` means as fast as possible: no delay between tokens (benchmarks use
    /// it, with the two above at `0`, as a zero-latency backend). Default `50`.
    pub tokens_per_s: f64,
    /// Shortest answer, in tokens. Default `16`.
    pub min_answer_tokens: u32,
    /// Longest answer, in tokens. Default `64`.
    pub max_answer_tokens: u32,
    /// Every model's context window, in tokens, unless the model sets its own: the prompt
    /// (as [`crate::prompt_tokens`] counts it) plus the requested completion budget
    /// (`max_completion_tokens`, else `max_tokens`, else nothing) must fit, or the request
    /// fails at once with `ContextLengthExceeded`. Must be above 0. Default `8192`.
    pub context_window: u32,
    /// The GPUs and their concurrency slots. Default: one `gpu0` with 4 slots and 24 GiB.
    pub gpus: Vec<GpuConfig>,
    /// Models loaded at start. Default: `sim-llama` on `gpu0`.
    pub models: Vec<SimModel>,
    /// Requests allowed to wait for a slot, per GPU; one more is refused with `Overloaded`.
    /// Default `64`.
    pub max_queue: u32,
    /// Faults in force at start; change them at run time with `Simulator::set_faults`.
    /// Default: none.
    pub faults: Faults,
    /// Transcription: fixed latency after the request gets a slot. Default `50`.
    pub transcribe_base_ms: u64,
    /// Transcription: latency per second of audio, in milliseconds. Default `30` (a GPU
    /// Whisper at about 30× real time: a minute of audio in 1.85 s with the base).
    pub transcribe_ms_per_audio_s: u64,
    /// The longest audio transcribed, in seconds; longer audio is refused at once
    /// (`InvalidInput`, param `file`, code `audio_too_long`). Must be above 0. Default `600`.
    pub max_audio_s: u32,
    /// Speech: time to first audio after the request gets a slot. Default `80`.
    pub speech_ttfa_ms: u64,
    /// Speech: how much faster than real time audio is produced after the first chunk; `0`
    /// means as fast as possible. Default `10` (a chunk of 100 ms every 10 ms).
    pub speech_realtime_factor: f64,
    /// Speech: the audio in each streamed chunk, in milliseconds (1 to 10000). Default `100`.
    pub speech_chunk_ms: u32,
    /// Embeddings: fixed latency after the request gets a slot. Default `5`.
    pub embed_base_ms: u64,
    /// Embeddings: latency per input token (see [`crate::embedding_tokens`]), in
    /// microseconds. Default `50`.
    pub embed_us_per_token: u64,
}

impl SimConfig {
    /// This config with every delay at zero and room for any load: the "direct backend"
    /// reference of the gateway-overhead benchmark (`edgeroute sim --zero-latency`). It must
    /// never queue, so it gets as many slots and queue places as the gateway admits.
    pub fn into_overhead_reference(mut self) -> Self {
        self.ttft_base_ms = 0;
        self.prefill_us_per_token = 0;
        self.tokens_per_s = 0.0;
        self.zero_voice_delays();
        for g in &mut self.gpus {
            g.slots = g.slots.max(100_000);
        }
        self.max_queue = self.max_queue.max(100_000);
        self
    }
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            seed: 0,
            ttft_base_ms: 40,
            prefill_us_per_token: 200,
            tokens_per_s: 50.0,
            min_answer_tokens: 16,
            max_answer_tokens: 64,
            context_window: DEFAULT_CONTEXT_WINDOW,
            gpus: vec![GpuConfig::new("gpu0")],
            models: vec![SimModel::new("sim-llama", "gpu0")],
            max_queue: 64,
            faults: Faults::default(),
            transcribe_base_ms: 50,
            transcribe_ms_per_audio_s: 30,
            max_audio_s: 600,
            speech_ttfa_ms: 80,
            speech_realtime_factor: 10.0,
            speech_chunk_ms: 100,
            embed_base_ms: 5,
            embed_us_per_token: 50,
        }
    }
}

impl SimConfig {
    /// The defaults with every delay at zero: the reference backend for overhead benchmarks.
    pub fn zero_latency() -> Self {
        let mut c = SimConfig {
            ttft_base_ms: 0,
            prefill_us_per_token: 0,
            tokens_per_s: 0.0,
            ..Self::default()
        };
        c.zero_voice_delays();
        c
    }

    /// Zeroes the transcription, speech and embedding delays.
    fn zero_voice_delays(&mut self) {
        self.transcribe_base_ms = 0;
        self.transcribe_ms_per_audio_s = 0;
        self.speech_ttfa_ms = 0;
        self.speech_realtime_factor = 0.0;
        self.embed_base_ms = 0;
        self.embed_us_per_token = 0;
    }

    /// Checks what serde cannot: references between sections and value ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_timing("tokens_per_s", Some(self.tokens_per_s))?;
        check_delay("ttft_base_ms", self.ttft_base_ms, MAX_DELAY_MS)?;
        check_delay("prefill_us_per_token", self.prefill_us_per_token, MAX_PREFILL_US)?;
        check_window("context_window", Some(self.context_window))?;
        check_delay("transcribe_base_ms", self.transcribe_base_ms, MAX_DELAY_MS)?;
        check_delay(
            "transcribe_ms_per_audio_s",
            self.transcribe_ms_per_audio_s,
            MAX_PER_AUDIO_S_MS,
        )?;
        if self.max_audio_s == 0 || self.max_audio_s > MAX_AUDIO_S {
            return Err(ConfigError::OutOfRange {
                key: "max_audio_s",
                value: self.max_audio_s.to_string(),
            });
        }
        check_delay("speech_ttfa_ms", self.speech_ttfa_ms, MAX_DELAY_MS)?;
        check_timing("speech_realtime_factor", Some(self.speech_realtime_factor))?;
        if self.speech_chunk_ms == 0 || self.speech_chunk_ms > 10_000 {
            return Err(ConfigError::OutOfRange {
                key: "speech_chunk_ms",
                value: self.speech_chunk_ms.to_string(),
            });
        }
        check_delay("embed_base_ms", self.embed_base_ms, MAX_DELAY_MS)?;
        check_delay("embed_us_per_token", self.embed_us_per_token, MAX_PREFILL_US)?;
        if self.max_answer_tokens == 0 || self.min_answer_tokens > self.max_answer_tokens {
            return Err(ConfigError::AnswerBounds {
                min: self.min_answer_tokens,
                max: self.max_answer_tokens,
            });
        }
        if self.gpus.is_empty() {
            return Err(ConfigError::NoGpus);
        }
        for (i, g) in self.gpus.iter().enumerate() {
            if g.id.is_empty() {
                return Err(ConfigError::EmptyId("gpus"));
            }
            if self.gpus[..i].iter().any(|o| o.id == g.id) {
                return Err(ConfigError::DuplicateGpu(g.id.clone()));
            }
            if g.slots == 0 {
                return Err(ConfigError::NoSlots(g.id.clone()));
            }
        }
        for (i, m) in self.models.iter().enumerate() {
            if self.models[..i].iter().any(|o| o.id == m.id) {
                return Err(ConfigError::DuplicateModel(m.id.clone()));
            }
            m.validate(&self.gpus)?;
        }
        for g in &self.gpus {
            let used: u64 = self.models.iter().filter(|m| m.gpu == g.id).map(|m| m.memory_mb).sum();
            if used > g.memory_total_mb {
                return Err(ConfigError::OutOfMemory {
                    gpu: g.id.clone(),
                    needed_mb: used,
                    total_mb: g.memory_total_mb,
                });
            }
        }
        self.faults.validate()
    }
}

/// Delays longer than an hour are surely a unit mistake, and keeping them bounded keeps every
/// deadline computation far from overflow.
const MAX_DELAY_MS: u64 = 3_600_000;
const MAX_PREFILL_US: u64 = 1_000_000;
/// A minute per second of audio is already sixty times slower than real time.
const MAX_PER_AUDIO_S_MS: u64 = 60_000;
/// A day of audio: far beyond any real transcription request.
const MAX_AUDIO_S: u32 = 86_400;

/// `SimConfig::context_window`'s default: a common size for small chat models.
const DEFAULT_CONTEXT_WINDOW: u32 = 8192;

fn check_window(key: &'static str, window: Option<u32>) -> Result<(), ConfigError> {
    match window {
        Some(0) => Err(ConfigError::OutOfRange { key, value: "0".into() }),
        _ => Ok(()),
    }
}

fn check_delay(key: &'static str, value: u64, max: u64) -> Result<(), ConfigError> {
    if value > max {
        return Err(ConfigError::OutOfRange { key, value: value.to_string() });
    }
    Ok(())
}

fn check_timing(key: &'static str, tokens_per_s: Option<f64>) -> Result<(), ConfigError> {
    match tokens_per_s {
        Some(t) if !t.is_finite() || t < 0.0 => {
            Err(ConfigError::OutOfRange { key, value: t.to_string() })
        }
        _ => Ok(()),
    }
}

/// One GPU: its concurrency slots (batch lanes) and memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuConfig {
    /// Name, e.g. `gpu0`. Required.
    pub id: String,
    /// Requests served at once; more wait in this GPU's FIFO queue. Default `4`.
    #[serde(default = "default_slots")]
    pub slots: u32,
    /// Memory, for placement checks and health reports. Default `24576` (24 GiB).
    #[serde(default = "default_gpu_memory")]
    pub memory_total_mb: u64,
}

fn default_slots() -> u32 {
    4
}

fn default_gpu_memory() -> u64 {
    24_576
}

impl GpuConfig {
    /// A GPU with the default slots and memory.
    pub fn new(id: impl Into<String>) -> Self {
        GpuConfig { id: id.into(), slots: default_slots(), memory_total_mb: default_gpu_memory() }
    }
}

/// One simulated model, pinned to a GPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimModel {
    /// The id clients put in `model`. Required.
    pub id: String,
    /// The GPU it runs on. Default `gpu0`.
    #[serde(default = "default_gpu")]
    pub gpu: String,
    /// Memory it takes on its GPU. Default `4096`.
    #[serde(default = "default_model_memory")]
    pub memory_mb: u64,
    /// Overrides the global `ttft_base_ms` for this model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttft_base_ms: Option<u64>,
    /// Overrides the global `prefill_us_per_token` for this model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill_us_per_token: Option<u64>,
    /// Overrides the global `tokens_per_s` for this model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_s: Option<f64>,
    /// Overrides the global `context_window` for this model. Must be above 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_window: Option<u32>,
}

fn default_gpu() -> String {
    "gpu0".into()
}

fn default_model_memory() -> u64 {
    4096
}

impl SimModel {
    /// A model with the default memory and the global timing and context window.
    pub fn new(id: impl Into<String>, gpu: impl Into<String>) -> Self {
        SimModel {
            id: id.into(),
            gpu: gpu.into(),
            memory_mb: default_model_memory(),
            ttft_base_ms: None,
            prefill_us_per_token: None,
            tokens_per_s: None,
            context_window: None,
        }
    }

    /// Checks the model on its own and that its GPU exists (memory is checked by the caller,
    /// which knows what else is loaded).
    pub(crate) fn validate(&self, gpus: &[GpuConfig]) -> Result<(), ConfigError> {
        if self.id.is_empty() {
            return Err(ConfigError::EmptyId("models"));
        }
        if !gpus.iter().any(|g| g.id == self.gpu) {
            return Err(ConfigError::UnknownGpu { model: self.id.clone(), gpu: self.gpu.clone() });
        }
        check_timing("models.tokens_per_s", self.tokens_per_s)?;
        check_window("models.context_window", self.context_window)?;
        check_delay("models.ttft_base_ms", self.ttft_base_ms.unwrap_or(0), MAX_DELAY_MS)?;
        check_delay(
            "models.prefill_us_per_token",
            self.prefill_us_per_token.unwrap_or(0),
            MAX_PREFILL_US,
        )
    }
}

/// Injected faults. All default to off; settable at run time.
///
/// `stall_after_tokens`, `cut_after_tokens` and `slow_token_ms` apply to requests that arrive
/// after they are set (a stream keeps the faults it started with); `crash` hits every
/// request at once, in flight or queued.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Probability in [0, 1] that a request fails before its first token (after its queue
    /// wait and time to first token, as a backend failing during prefill would).
    pub error_rate: f64,
    /// The stream stops producing after this many tokens, forever (until the consumer drops
    /// it). `0` stalls before the first token. An answer shorter than this is unaffected.
    pub stall_after_tokens: Option<u32>,
    /// The stream ends with an error after this many tokens, when the next one was due.
    /// `0` fails the request before its first token. An answer shorter than this is
    /// unaffected.
    pub cut_after_tokens: Option<u32>,
    /// Extra delay between consecutive tokens, in milliseconds. The first token is not delayed.
    pub slow_token_ms: u64,
    /// Every request fails at once with `Refused`, as if the backend's port were closed.
    pub refuse_connections: bool,
    /// The backend is down: every in-flight or queued request fails at once with `Crashed`,
    /// and new ones fail with `Crashed` until this is cleared.
    pub crash: bool,
    /// Probability in [0, 1] that a request is answered with garbage: the same length and
    /// timing, words drawn from another key (one per request), as a corrupted model would
    /// answer while the node's `/health` stays fine. Rolled like `error_rate` (seed and
    /// request number, never OS randomness). Left out of the JSON when 0.
    #[serde(skip_serializing_if = "is_zero")]
    pub garbage_rate: f64,
}

fn is_zero(v: &f64) -> bool {
    *v == 0.0
}

impl Faults {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(0.0..=1.0).contains(&self.error_rate) {
            return Err(ConfigError::OutOfRange {
                key: "faults.error_rate",
                value: self.error_rate.to_string(),
            });
        }
        if !(0.0..=1.0).contains(&self.garbage_rate) {
            return Err(ConfigError::OutOfRange {
                key: "faults.garbage_rate",
                value: self.garbage_rate.to_string(),
            });
        }
        check_delay("faults.slow_token_ms", self.slow_token_ms, MAX_DELAY_MS)
    }
}

/// A configuration the simulator cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("at least one GPU is required")]
    NoGpus,
    #[error("an entry in `{0}` has an empty id")]
    EmptyId(&'static str),
    #[error("GPU `{0}` is defined twice")]
    DuplicateGpu(String),
    #[error("GPU `{0}` has no slots")]
    NoSlots(String),
    #[error("model `{0}` is defined twice")]
    DuplicateModel(String),
    #[error("model `{model}` is pinned to unknown GPU `{gpu}`")]
    UnknownGpu { model: String, gpu: String },
    #[error("models on GPU `{gpu}` need {needed_mb} MB but it has {total_mb} MB")]
    OutOfMemory { gpu: String, needed_mb: u64, total_mb: u64 },
    #[error("answer bounds min={min} max={max}: need 1 <= max and min <= max")]
    AnswerBounds { min: u32, max: u32 },
    #[error("`{key}` = {value} is out of range")]
    OutOfRange { key: &'static str, value: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_is_the_documented_default() {
        let c: SimConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c, SimConfig::default());
        assert_eq!(
            c.gpus,
            vec![GpuConfig { id: "gpu0".into(), slots: 4, memory_total_mb: 24_576 }]
        );
        assert_eq!(c.models[0].id, "sim-llama");
        assert_eq!((c.context_window, c.models[0].context_window), (8192, None));
        c.validate().unwrap();
    }

    #[test]
    fn unknown_keys_are_rejected_everywhere() {
        for raw in [
            r#"{"sed":1}"#,
            r#"{"gpus":[{"id":"g","slot":2}]}"#,
            r#"{"models":[{"id":"m","gpu_id":"g"}]}"#,
            r#"{"faults":{"eror_rate":0.5}}"#,
            r#"{"context_windw":512}"#,
            r#"{"models":[{"id":"m","context":512}]}"#,
        ] {
            assert!(serde_json::from_str::<SimConfig>(raw).is_err(), "{raw}");
        }
    }

    #[test]
    fn nested_defaults_apply() {
        let c: SimConfig = serde_json::from_str(
            r#"{"gpus":[{"id":"g1"}],"models":[{"id":"m","gpu":"g1","tokens_per_s":10}],
                "faults":{"crash":true}}"#,
        )
        .unwrap();
        assert_eq!(c.gpus[0].slots, 4);
        assert_eq!(c.models[0].memory_mb, 4096);
        assert_eq!(c.models[0].tokens_per_s, Some(10.0));
        assert!(c.faults.crash && c.faults.error_rate == 0.0);
        c.validate().unwrap();
    }

    #[test]
    fn context_windows_parse_globally_and_per_model() {
        let c: SimConfig = serde_json::from_str(
            r#"{"context_window":512,"models":[{"id":"a"},{"id":"b","context_window":100}]}"#,
        )
        .unwrap();
        assert_eq!(c.context_window, 512);
        assert_eq!((c.models[0].context_window, c.models[1].context_window), (None, Some(100)));
        c.validate().unwrap();
        // An unset override is not written back out, so configs round-trip unchanged.
        let json = serde_json::to_string(&c.models[0]).unwrap();
        assert!(!json.contains("context_window"), "{json}");
    }

    #[test]
    fn voice_timing_has_defaults_and_parses() {
        let c = SimConfig::default();
        assert_eq!(
            (c.transcribe_base_ms, c.transcribe_ms_per_audio_s, c.max_audio_s),
            (50, 30, 600)
        );
        assert_eq!(
            (c.speech_ttfa_ms, c.speech_realtime_factor, c.speech_chunk_ms),
            (80, 10.0, 100)
        );
        assert_eq!((c.embed_base_ms, c.embed_us_per_token), (5, 50));
        let c: SimConfig = serde_json::from_str(
            r#"{"transcribe_base_ms":1,"transcribe_ms_per_audio_s":2,"max_audio_s":3,
                "speech_ttfa_ms":4,"speech_realtime_factor":0,"speech_chunk_ms":20,
                "embed_base_ms":6,"embed_us_per_token":7}"#,
        )
        .unwrap();
        assert_eq!(
            (c.transcribe_base_ms, c.transcribe_ms_per_audio_s, c.max_audio_s, c.speech_ttfa_ms),
            (1, 2, 3, 4)
        );
        assert_eq!((c.speech_realtime_factor, c.speech_chunk_ms), (0.0, 20));
        assert_eq!((c.embed_base_ms, c.embed_us_per_token), (6, 7));
        c.validate().unwrap();
        // Zero latency means every delay, the voice ones too; the limits stay.
        let z = SimConfig::zero_latency();
        assert_eq!(
            (z.transcribe_base_ms, z.transcribe_ms_per_audio_s, z.speech_ttfa_ms, z.embed_base_ms),
            (0, 0, 0, 0)
        );
        assert_eq!((z.speech_realtime_factor, z.embed_us_per_token, z.max_audio_s), (0.0, 0, 600));
        let o = SimConfig::default().into_overhead_reference();
        assert_eq!((o.speech_ttfa_ms, o.transcribe_base_ms, o.embed_base_ms), (0, 0, 0));
    }

    #[test]
    fn validation_catches_bad_voice_timing() {
        let key = |f: fn(&mut SimConfig)| {
            let mut c = SimConfig::default();
            f(&mut c);
            match c.validate().unwrap_err() {
                ConfigError::OutOfRange { key, .. } => key,
                e => panic!("{e}"),
            }
        };
        assert_eq!(key(|c| c.max_audio_s = 0), "max_audio_s");
        assert_eq!(key(|c| c.max_audio_s = 86_401), "max_audio_s");
        assert_eq!(key(|c| c.speech_chunk_ms = 0), "speech_chunk_ms");
        assert_eq!(key(|c| c.speech_chunk_ms = 10_001), "speech_chunk_ms");
        assert_eq!(key(|c| c.speech_realtime_factor = -1.0), "speech_realtime_factor");
        assert_eq!(key(|c| c.speech_realtime_factor = f64::NAN), "speech_realtime_factor");
        assert_eq!(key(|c| c.speech_ttfa_ms = 3_600_001), "speech_ttfa_ms");
        assert_eq!(key(|c| c.transcribe_base_ms = 3_600_001), "transcribe_base_ms");
        assert_eq!(key(|c| c.transcribe_ms_per_audio_s = 60_001), "transcribe_ms_per_audio_s");
        assert_eq!(key(|c| c.embed_base_ms = 3_600_001), "embed_base_ms");
        assert_eq!(key(|c| c.embed_us_per_token = 1_000_001), "embed_us_per_token");
    }

    #[test]
    fn validation_catches_bad_references_and_ranges() {
        let bad = |f: fn(&mut SimConfig)| {
            let mut c = SimConfig::default();
            f(&mut c);
            c.validate().unwrap_err()
        };
        assert_eq!(bad(|c| c.gpus.clear()), ConfigError::NoGpus);
        assert_eq!(bad(|c| c.gpus[0].slots = 0), ConfigError::NoSlots("gpu0".into()));
        assert!(matches!(bad(|c| c.models[0].gpu = "gpu9".into()), ConfigError::UnknownGpu { .. }));
        assert!(matches!(bad(|c| c.models[0].memory_mb = 30_000), ConfigError::OutOfMemory { .. }));
        assert!(matches!(bad(|c| c.min_answer_tokens = 100), ConfigError::AnswerBounds { .. }));
        assert!(matches!(bad(|c| c.tokens_per_s = -1.0), ConfigError::OutOfRange { .. }));
        assert!(matches!(bad(|c| c.faults.error_rate = 1.5), ConfigError::OutOfRange { .. }));
        assert_eq!(
            bad(|c| c.context_window = 0),
            ConfigError::OutOfRange { key: "context_window", value: "0".into() }
        );
        assert_eq!(
            bad(|c| c.models[0].context_window = Some(0)),
            ConfigError::OutOfRange { key: "models.context_window", value: "0".into() }
        );
        assert!(matches!(
            bad(|c| c.models.push(SimModel::new("sim-llama", "gpu0"))),
            ConfigError::DuplicateModel(_)
        ));
    }
}
