//! What the SDK's integration tests share.
#![allow(dead_code)] // Each test file uses part of it.

use std::time::{Duration, Instant};

use edgeroute_client::{Client, Session};

/// A session on `model`, retried for up to 5 s while discovery has not verified the fleet yet.
pub async fn session_when_ready(client: &Client, model: &str) -> Session {
    let t = Instant::now();
    loop {
        match client.session(model).await {
            Ok(s) => return s,
            Err(_) if t.elapsed() < Duration::from_secs(5) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("no session: {e}"),
        }
    }
}
