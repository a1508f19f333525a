//! A simulated inference backend: realistic in its timing, exact in its answers.
//!
//! edgeroute needs a backend on machines without GPUs: as the edge node's default backend,
//! as the "direct backend" reference in gateway-overhead benchmarks, and as every node of a
//! fleet lab. This crate is that backend.
//!
//! - [`Simulator`] (module `engine`) models GPUs with concurrency slots and FIFO queues, the
//!   time to first token (queue wait + base + prefill per prompt token), decode speed, and
//!   run-time fault knobs ([`Faults`]: errors, stalls, cuts, slow tokens, refusals, crashes,
//!   garbage answers behind a healthy `/health`).
//!   [`Simulator::generate`] resolves at the stream's commit point: the first token is ready,
//!   or the request failed before it.
//! - The rest of a voice agent's surface runs on the same slots, queues and faults (module
//!   `engine::voice`): [`Simulator::transcribe`] (latency per second of audio),
//!   [`Simulator::speech`] (a [`SpeechStream`] of WAV or PCM chunks after a time to first
//!   audio, paced faster than real time) and [`Simulator::embed`]. What they return is pure
//!   (modules `audio` and `embed`): [`expected_transcript`], [`expected_speech`] and
//!   [`expected_embedding`] predict it.
//! - A realtime session (module `realtime`): OpenAI's realtime events over channels, its
//!   audio transcribed and its answers spoken by the engines above.
//! - Answers (module `text`) are a pure function of the seed, the model and the
//!   conversation, so [`expected_answer`] and [`expected_completion`] tell a test every token
//!   a stream must carry, and a stream cut on one node can be continued token-exactly on
//!   another (`continue_final_message`).
//! - [`server::router`] serves it all as an OpenAI-compatible HTTP API, lean enough to be
//!   the reference in a latency benchmark; [`serve`] runs it on a listener (`edgeroute sim`)
//!   in `edgeroute-http`'s accept loop.
//!
//! What this crate does not do: accept TCP connections itself or parse a command line (the
//! `edgeroute-http` crate and the `edgeroute` binary do), read files or the environment, or
//! read the wall clock anywhere but the `created` timestamp of HTTP responses.

pub mod audio;
pub mod config;
pub mod embed;
pub mod engine;
pub mod error;
pub mod realtime;
pub mod server;
mod standalone;
pub mod text;

pub use audio::{
    AudioFormat, SPEECH_SAMPLE_RATE, Segment, Transcript, expected_speech, expected_transcript,
};
pub use config::{ConfigError, Faults, GpuConfig, SimConfig, SimModel};
pub use embed::{embedding_tokens, expected_embedding};
pub use engine::{
    Completion, Generation, GpuStatus, SimEvent, Simulator, SpeechStream, TranscriptEvent,
    TranscriptStream, transcript_sse,
};
pub use error::SimError;
pub use standalone::serve;
pub use text::{ExpectedCompletion, expected_answer, expected_completion, prompt_tokens};
