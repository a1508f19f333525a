//! edgeroute-lab: measurement tools that nothing in production depends on.
//!
//! - [`loadgen`]: an open-loop, coordinated-omission-safe load generator for the
//!   OpenAI-compatible chat endpoint (JSON and SSE), loopback targets only.
//! - [`gateway_bench`]: the published gateway-overhead benchmark, which starts the simulator,
//!   the gateway and nginx as child processes and loads them all in one run.
//! - [`process`]: child-process supervision (kill on drop) and RSS sampling from `/proc`.
//! - [`memnet`], [`wan`], [`relay`]: emulated networks — an in-memory one for deterministic
//!   runs, delayed TCP links, a TCP relay that can be cut.
//! - [`compare`]: DNS-style, central proxy, edgeroute and an oracle on one emulated network
//!   (`edgeroute bench fleet`).
//! - [`chart`]: PNG charts for reports.

pub mod chart;
pub mod compare;
pub mod gateway_bench;
pub mod loadgen;
pub mod memnet;
mod pipe;
pub mod process;
pub mod relay;
pub mod wan;
