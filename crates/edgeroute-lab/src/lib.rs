//! edgeroute-lab: measurement tools that nothing in production depends on, and the
//! `edgeroute-lab` binary that runs them (`demo`, `bench …`; the shipped `edgeroute` binary
//! carries none of this).
//!
//! - [`demo`]: a three-region fleet on loopback and a short story (`edgeroute-lab demo`).
//! - [`loadgen`]: an open-loop, coordinated-omission-safe load generator for the
//!   OpenAI-compatible chat endpoint (JSON and SSE) and any other POST endpoint (a streamed
//!   answer timed to its first byte: speech), loopback targets only.
//! - [`gateway_bench`]: the published gateway-overhead benchmark, which starts the simulator,
//!   the gateway (the `edgeroute` binary) and nginx as child processes and loads them all in
//!   one run.
//! - [`batch_bench`]: batch throughput through the router's `[jobs]` against a simulator
//!   fleet's computed capacity (`edgeroute-lab bench batch`).
//! - [`sdk_bench`], [`discovery_bench`], [`bus_bench`]: the SDK's costs, discovery under load
//!   and topology freshness, topology propagation over the bus.
//! - [`policy_bench`]: a routing policy pushed over NATS to three discovery replicas, timed
//!   until all three have it in force (`edgeroute-lab bench policy-push`).
//! - [`synthetic`]: deterministic synthetic fleets for discovery's benchmarks.
//! - [`process`]: child-process supervision (kill on drop) and RSS sampling from `/proc`.
//! - [`memnet`], [`wan`], [`relay`]: emulated networks — an in-memory one for deterministic
//!   runs, delayed TCP links, a TCP relay that can be cut.
//! - [`compare`]: DNS-style, central proxy, edgeroute and an oracle on one emulated network
//!   (`edgeroute-lab bench fleet`).
//! - [`chart`]: PNG charts for reports.
//! - [`voice`]: what the lab sends to the voice surface (WAV clips, the multipart upload,
//!   the speech, embeddings and completions bodies) and reads back from a node's `/metrics`.

pub mod batch_bench;
pub mod bus_bench;
pub mod chart;
pub mod compare;
pub mod demo;
pub mod discovery_bench;
pub mod dns_bench;
pub mod fleet;
pub mod gateway_bench;
pub mod loadgen;
pub mod memnet;
mod pipe;
pub mod policy_bench;
pub mod process;
pub mod relay;
pub mod sdk_bench;
pub mod soak;
pub mod synthetic;
pub mod voice;
pub mod wan;
