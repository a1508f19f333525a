//! Hardened HTTP serving for every edgeroute server (node gateway, simulator, discovery, proxy).
//!
//! `axum::serve` installs no timer, so a slowloris client holds a connection forever; and
//! hyper's own header-read timeout, once given a timer, runs while an HTTP/1.1 connection is
//! idle between requests (closing keep-alive connections after a few seconds) but not while
//! hyper-util reads the protocol preface. This crate runs its own accept loop on hyper-util's
//! auto (HTTP/1.1 + HTTP/2) builder with its own request-head deadline (armed at accept and at
//! the first byte of each request, disarmed when the head is parsed), and adds what an
//! internet-facing server needs: a connection cap with backpressure, an idle timeout for
//! keep-alive connections, optional TLS (rustls), and a graceful shutdown that lets in-flight
//! responses (including long SSE streams) finish within a grace period.
//!
//! The loop is generic over [`Listener`], so the same code runs on tokio sockets in production
//! and on a simulated network in tests. It knows nothing of routes or auth.

pub mod error;
pub mod json;
mod listener;
mod serve;
pub mod tls;

pub use error::ApiError;
pub use listener::Listener;
pub use serve::{ServerLimits, serve};
