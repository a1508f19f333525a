//! What the integration tests share: a `/health` stub and `dig`.
#![allow(dead_code)] // Each test file uses part of it.
#![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

use std::net::SocketAddr;

/// A `/health` that answers 200 until its task is aborted (then connections are refused).
pub async fn health_stub(at: SocketAddr) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket.bind(at).unwrap();
    let listener = socket.listen(64).unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().route("/health", axum::routing::get(|| async { "ok" }));
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, task)
}

pub fn dig(port: u16, args: &[&str]) -> String {
    let out = std::process::Command::new("dig")
        .args(["@127.0.0.1", "-p", &port.to_string(), "+time=1", "+tries=1"])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("`dig` did not run ({e}): apt-get install bind9-dnsutils"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `+short` answers, in order.
pub fn short(port: u16, subnet: &str, extra: &[&str]) -> Vec<String> {
    let net = format!("+subnet={subnet}");
    let mut args = vec!["+short", net.as_str(), "discovery.edge.test", "A"];
    args.extend_from_slice(extra);
    dig(port, &args).lines().map(str::to_owned).collect()
}
