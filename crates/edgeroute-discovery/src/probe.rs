//! Pulling each node's `/health`: the network seam ([`Probe`]) and the per-node schedule.
//!
//! Every node has its own task: one probe at once when the node appears (a new node is not
//! served until a probe verifies it), then one per interval at a phase derived from the node's
//! id, so a thousand nodes are probed evenly across the second instead of in one burst. A probe
//! never overlaps the next: a slow node costs its own task a timeout, nothing else.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use edgeroute_proto::health::NodeHealth;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

/// Why a probe failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    #[error("connect: {0}")]
    Connect(String),
    #[error("no answer within {0} ms")]
    Timeout(u64),
    #[error("HTTP {0}")]
    Status(u16),
    #[error("body: {0}")]
    Body(String),
    #[error("not a health report: {0}")]
    Decode(String),
}

impl ProbeError {
    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ProbeError::Connect(_) => "connect",
            ProbeError::Timeout(_) => "timeout",
            ProbeError::Status(_) => "status",
            ProbeError::Body(_) => "body",
            ProbeError::Decode(_) => "decode",
        }
    }
}

pub type ProbeFuture = Pin<Box<dyn Future<Output = Result<NodeHealth, ProbeError>> + Send>>;

/// Fetches one node's health report. The seam between the schedule and the network: tests
/// and simulations provide their own.
pub trait Probe: Send + Sync + std::fmt::Debug + 'static {
    fn probe(&self, health_uri: http::Uri) -> ProbeFuture;
}

/// `<base>/health` for a node's base URL, if it is an `http://` or `https://` URL with a
/// host and no query.
pub fn health_uri(base: &str) -> Option<http::Uri> {
    let uri: http::Uri = base.parse().ok()?;
    let scheme = uri.scheme_str()?;
    if !matches!(scheme, "http" | "https") || uri.host().is_none_or(str::is_empty) {
        return None;
    }
    if uri.query().is_some() {
        return None;
    }
    let path = uri.path().trim_end_matches('/');
    format!("{scheme}://{}{path}/health", uri.authority()?).parse().ok()
}

pub use edgeroute_http::client::tls_config;

/// Probes over HTTP/1.1 with pooled keep-alive connections, a deadline per probe and a cap on
/// the body.
#[derive(Clone)]
pub struct HttpProbe {
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
    timeout: Duration,
    max_body: usize,
}

impl std::fmt::Debug for HttpProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpProbe").field("timeout", &self.timeout).finish_non_exhaustive()
    }
}

impl HttpProbe {
    /// A prober; `tls` verifies `https://` nodes (see [`tls_config`]).
    pub fn new(timeout: Duration, max_body: usize, tls: rustls::ClientConfig) -> Self {
        let opts = edgeroute_http::client::ClientOptions {
            connect_timeout: timeout,
            pool_idle_timeout: Duration::from_secs(30),
            pool_max_idle_per_host: 1,
        };
        let client = edgeroute_http::client::https_client(&opts, tls);
        HttpProbe { client, timeout, max_body }
    }
}

impl Probe for HttpProbe {
    fn probe(&self, uri: http::Uri) -> ProbeFuture {
        let this = self.clone();
        Box::pin(async move {
            let timeout_ms = this.timeout.as_millis() as u64;
            let work = async {
                let req = http::Request::get(uri)
                    .header(http::header::USER_AGENT, "edgeroute-discovery")
                    .body(Empty::new())
                    .map_err(|e| ProbeError::Connect(e.to_string()))?;
                let resp =
                    this.client.request(req).await.map_err(|e| ProbeError::Connect(source(&e)))?;
                let status = resp.status();
                // A node shutting down answers 503 with its report: still an answer.
                if status != http::StatusCode::OK && status != http::StatusCode::SERVICE_UNAVAILABLE
                {
                    return Err(ProbeError::Status(status.as_u16()));
                }
                let body = Limited::new(resp.into_body(), this.max_body)
                    .collect()
                    .await
                    .map_err(|e| ProbeError::Body(e.to_string()))?
                    .to_bytes();
                serde_json::from_slice::<NodeHealth>(&body).map_err(|e| {
                    if status.is_success() {
                        ProbeError::Decode(e.to_string())
                    } else {
                        ProbeError::Status(status.as_u16())
                    }
                })
            };
            tokio::time::timeout(this.timeout, work)
                .await
                .unwrap_or(Err(ProbeError::Timeout(timeout_ms)))
        })
    }
}

fn source(e: &hyper_util::client::legacy::Error) -> String {
    let mut s = e.to_string();
    let mut cur: Option<&dyn std::error::Error> = std::error::Error::source(e);
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// What a finished probe reports: node id, when it was sent, when it ended, the outcome.
pub type Sink = Arc<dyn Fn(&str, Duration, Duration, Result<NodeHealth, ProbeError>) + Send + Sync>;

struct Task {
    url: String,
    kick: Arc<Notify>,
    handle: JoinHandle<()>,
}

/// The set of per-node probe tasks.
pub struct Scheduler {
    probe: Arc<dyn Probe>,
    interval: Duration,
    sink: Sink,
    started: Instant,
    tasks: HashMap<String, Task>,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler").field("nodes", &self.tasks.len()).finish_non_exhaustive()
    }
}

/// A stable phase in `[0, interval)` for `id` (FNV-1a), spreading probes over the interval.
fn phase(id: &str, interval: Duration) -> Duration {
    let h = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let ms = interval.as_millis().max(1) as u64;
    Duration::from_millis(h % ms)
}

impl Scheduler {
    pub fn new(probe: Arc<dyn Probe>, interval: Duration, started: Instant, sink: Sink) -> Self {
        Scheduler { probe, interval, sink, started, tasks: HashMap::new() }
    }

    /// Probes `id` at `url` from now on (at once, then on its schedule). A changed URL
    /// restarts the task; an unchanged one only asks for an immediate probe.
    pub fn ensure(&mut self, id: &str, url: &str) {
        if let Some(t) = self.tasks.get(id) {
            if t.url == url && !t.handle.is_finished() {
                t.kick.notify_one();
                return;
            }
            t.handle.abort();
        }
        let Some(uri) = health_uri(url) else {
            // Not probeable: remembered, so the failure is reported once, not per tick.
            (self.sink)(
                id,
                self.started.elapsed(),
                self.started.elapsed(),
                Err(ProbeError::Connect(format!("cannot probe `{url}`: not an http(s):// URL"))),
            );
            return;
        };
        let kick = Arc::new(Notify::new());
        let handle = tokio::spawn(run(
            id.to_owned(),
            uri,
            self.probe.clone(),
            self.interval,
            self.started,
            self.sink.clone(),
            kick.clone(),
        ));
        self.tasks.insert(id.to_owned(), Task { url: url.to_owned(), kick, handle });
    }

    /// Stops probing `id`.
    pub fn remove(&mut self, id: &str) {
        if let Some(t) = self.tasks.remove(id) {
            t.handle.abort();
        }
    }

    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        for t in self.tasks.values() {
            t.handle.abort();
        }
    }
}

async fn run(
    id: String,
    uri: http::Uri,
    probe: Arc<dyn Probe>,
    interval: Duration,
    started: Instant,
    sink: Sink,
    kick: Arc<Notify>,
) {
    let mut ticks = tokio::time::interval_at(Instant::now() + phase(&id, interval), interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        let sent = started.elapsed();
        let outcome = probe.probe(uri.clone()).await;
        sink(&id, sent, started.elapsed(), outcome);
        tokio::select! {
            _ = ticks.tick() => {}
            () = kick.notified() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_uris() {
        let u = |s: &str| health_uri(s).map(|u| u.to_string());
        assert_eq!(u("http://10.0.0.1:8080").as_deref(), Some("http://10.0.0.1:8080/health"));
        assert_eq!(u("http://h:1/edge/").as_deref(), Some("http://h:1/edge/health"));
        assert_eq!(u("https://h:1").as_deref(), Some("https://h:1/health"));
        assert_eq!(u("ftp://h:1"), None);
        assert_eq!(u("h:1"), None);
        assert_eq!(u("http://h/?x=1"), None);
    }

    #[test]
    fn phases_spread_and_are_stable() {
        let i = Duration::from_millis(1000);
        assert_eq!(phase("tor-1", i), phase("tor-1", i));
        let distinct: std::collections::BTreeSet<_> =
            (0..100).map(|n| phase(&format!("node-{n}"), i).as_millis() / 100).collect();
        assert!(distinct.len() >= 8, "100 nodes land in most tenths of the second");
    }
}
