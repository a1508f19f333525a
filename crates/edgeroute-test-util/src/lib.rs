//! Test support for edgeroute's integration tests: start real servers on loopback, talk to
//! them as clients do, and stand up upstreams that misbehave on purpose.
//!
//! Nothing in production depends on this crate.

pub mod client;
pub mod fake_hub;
pub mod fake_triton;
pub mod fake_upstream;
pub mod nats;
pub mod node;
pub mod source;

pub use client::{Reply, StreamReply, get, post_json, stream};
pub use node::{SECRET, TestNode};

/// Serves `router` on an ephemeral loopback port until the returned guard is dropped.
pub async fn spawn_router(router: axum::Router) -> ServerGuard {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let limits = edgeroute_http::ServerLimits {
        shutdown_grace: std::time::Duration::from_millis(100),
        ..Default::default()
    };
    let task = tokio::spawn(edgeroute_http::serve(listener, router, limits, None, async {
        let _ = rx.await;
    }));
    ServerGuard { addr, stop: Some(tx), task: Some(task) }
}

/// A running server; dropping it stops the server.
#[derive(Debug)]
pub struct ServerGuard {
    pub addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl ServerGuard {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops the server and waits for it to finish.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for ServerGuard {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}
