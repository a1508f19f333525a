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

pub mod config;
pub mod engine;
pub mod error;
pub mod server;
mod standalone;
pub mod text;

pub use config::{ConfigError, Faults, GpuConfig, SimConfig, SimModel};
pub use engine::{Completion, Generation, GpuStatus, SimEvent, Simulator};
pub use error::SimError;
pub use standalone::serve;
pub use text::{ExpectedCompletion, expected_answer, expected_completion, prompt_tokens};
