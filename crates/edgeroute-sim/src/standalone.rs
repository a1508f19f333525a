//! `edgeroute sim`: the simulator as its own OpenAI-compatible server, on a listener the
//! caller binds, in `edgeroute-http`'s accept loop (no auth: a backend, reachable only by a
//! gateway or a benchmark).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use edgeroute_http::{Listener, ServerLimits};

use crate::config::{ConfigError, SimConfig};
use crate::engine::Simulator;

/// Serves [`crate::server::router`] over a simulator built from `cfg` on `listener` until
/// `shutdown` resolves; streams in flight then get 5 s to finish.
pub async fn serve<L: Listener>(
    cfg: SimConfig,
    listener: L,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ConfigError> {
    let sim = Arc::new(Simulator::new(cfg)?);
    let limits = ServerLimits { shutdown_grace: Duration::from_secs(5), ..Default::default() };
    edgeroute_http::serve(listener, crate::server::router(sim), limits, None, shutdown).await;
    Ok(())
}
