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
//!
//! [`client`] is the other direction: the one builder of outbound HTTP clients. It is all the
//! SDK uses of this crate (the `server` feature, on by default, brings the rest). [`upstream`]
//! is the node's own client for its inference backend: one origin, connections driven inline
//! by the request that uses them.

pub mod client;
#[cfg(feature = "server")]
pub mod error;
#[cfg(feature = "server")]
pub mod h1;
#[cfg(feature = "server")]
pub mod json;
#[cfg(feature = "server")]
mod listener;
#[cfg(feature = "server")]
mod serve;
#[cfg(feature = "server")]
pub mod tls;
#[cfg(feature = "server")]
pub mod upstream;

#[cfg(feature = "server")]
pub use error::ApiError;
#[cfg(feature = "server")]
pub use listener::Listener;
#[cfg(feature = "server")]
pub use serve::{App, EdgeCounters, ServerLimits, runtime, serve, shutdown_signal};
