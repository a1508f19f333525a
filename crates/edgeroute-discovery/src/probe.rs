//! Pulling each node's `/health`: the network seam ([`Probe`]) and the per-node schedule.
//!
//! Every node has its own task: one probe at once when the node appears (a new node is not
//! served until a probe verifies it), then one per interval at a phase derived from the node's
//! id, so a thousand nodes are probed evenly across the second instead of in one burst. A probe
//! never overlaps the next: a slow node costs its own task a timeout, nothing else.
//!
//! Nodes known only from the bus (announced) are probed within one shared budget
//! ([`ProbeBudget`], `announced.max_probes_per_s`): a probe over it is skipped, so no amount of
//! announcing or URL churn makes the replica fetch more than that many URLs a second. Over
//! `https://` their certificate must chain to the fleet CA and be valid for the URL's host and
//! for `<node id>.<announced.identity_suffix>` ([`NodeIdentityVerifier`]).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use edgeroute_proto::health::NodeHealth;
use http_body_util::{BodyExt, Full, Limited};
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

/// One probe to send: the node it is for, its `/health` URI, and whether it is known only
/// from the bus.
#[derive(Debug, Clone)]
pub struct ProbeTarget {
    pub node_id: String,
    pub health: http::Uri,
    pub announced: bool,
}

/// Fetches one node's health report. The seam between the schedule and the network: tests
/// and simulations provide their own. (The reported `node_id` is compared with the target's
/// by the registry, whatever the probe.)
pub trait Probe: Send + Sync + std::fmt::Debug + 'static {
    fn probe(&self, health_uri: http::Uri) -> ProbeFuture;

    /// Probes `target`. The default ignores everything but the URI; [`HttpProbe`] checks an
    /// announced node's certificate identity.
    fn probe_target(&self, target: &ProbeTarget) -> ProbeFuture {
        self.probe(target.health.clone())
    }
}

/// The budget every probe of an announced node draws from: a token bucket of `rate` tokens a
/// second holding at most `rate`. Pure: time comes in.
#[derive(Debug, Clone)]
pub struct ProbeBudget {
    rate: f64,
    tokens: f64,
    last: Duration,
}

impl ProbeBudget {
    /// Full at the start.
    pub fn new(rate_per_s: u32) -> Self {
        let rate = f64::from(rate_per_s.max(1));
        ProbeBudget { rate, tokens: rate, last: Duration::ZERO }
    }

    /// Takes one probe's token at `now`, if there is one.
    pub fn try_take(&mut self, now: Duration) -> bool {
        let elapsed = now.saturating_sub(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The fleet CA's verifier plus one more check: the certificate is valid for the DNS name
/// `<node id>.<suffix>` as well as for the URL's host. Only the node holding a certificate
/// issued for its id can then answer as it, whatever URL the bus announced.
#[derive(Debug)]
pub struct NodeIdentityVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    identity: rustls_pki_types::ServerName<'static>,
}

impl NodeIdentityVerifier {
    pub fn new(
        inner: Arc<rustls::client::WebPkiServerVerifier>,
        identity_name: &str,
    ) -> Result<Self, String> {
        let identity = rustls_pki_types::ServerName::try_from(identity_name.to_owned())
            .map_err(|e| format!("`{identity_name}`: {e}"))?;
        Ok(NodeIdentityVerifier { inner, identity })
    }
}

impl rustls::client::danger::ServerCertVerifier for NodeIdentityVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &rustls_pki_types::CertificateDer<'_>,
        intermediates: &[rustls_pki_types::CertificateDer<'_>],
        server_name: &rustls_pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_name(&cert, &self.identity).map_err(|_| {
            rustls::Error::General(format!(
                "certificate identity: not valid for {}",
                self.identity.to_str()
            ))
        })?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The fleet CA as a verifier, from a PEM file.
pub fn fleet_verifier(
    ca_file: &std::path::Path,
) -> Result<Arc<rustls::client::WebPkiServerVerifier>, String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let certs = CertificateDer::pem_file_iter(ca_file)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("CA file {}: {e}", ca_file.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in certs {
        roots.add(c).map_err(|e| format!("CA file {}: {e}", ca_file.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("CA file {}: no certificate in it", ca_file.display()));
    }
    rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .map_err(|e| format!("CA file {}: {e}", ca_file.display()))
}

/// How announced `https://` nodes are verified: the fleet CA and the identity suffix.
#[derive(Debug, Clone)]
pub struct AnnouncedTls {
    pub fleet: Arc<rustls::client::WebPkiServerVerifier>,
    pub identity_suffix: String,
    /// Clients (one per announced node: each checks its own identity) kept at once.
    pub max_clients: usize,
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

type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Probes over HTTP/1.1 with pooled keep-alive connections, a deadline per probe and a cap on
/// the body.
#[derive(Clone)]
pub struct HttpProbe {
    client: HttpClient,
    timeout: Duration,
    max_body: usize,
    announced: Option<AnnouncedTls>,
    /// Announced nodes' clients, by node id.
    identified: Arc<Mutex<HashMap<String, HttpClient>>>,
    /// What a correctness probe asks (see [`crate::answer_probe`]); none: it asks nothing.
    pub(crate) answers: Option<Arc<crate::answer_probe::AnswerSpec>>,
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
        HttpProbe {
            client,
            timeout,
            max_body,
            announced: None,
            identified: Arc::new(Mutex::new(HashMap::new())),
            answers: None,
        }
    }

    /// Verifies announced `https://` nodes as `tls` says (without it they cannot be probed
    /// over https).
    pub fn with_announced(mut self, tls: AnnouncedTls) -> Self {
        self.announced = Some(tls);
        self
    }

    fn opts(&self) -> edgeroute_http::client::ClientOptions {
        edgeroute_http::client::ClientOptions {
            connect_timeout: self.timeout,
            pool_idle_timeout: Duration::from_secs(30),
            pool_max_idle_per_host: 1,
        }
    }

    /// The client that verifies `node_id`'s certificate identity (built once per node).
    pub(crate) fn identified_client(&self, node_id: &str) -> Result<HttpClient, ProbeError> {
        let Some(a) = &self.announced else {
            return Err(ProbeError::Connect(
                "an announced https:// node needs a fleet CA (probe.ca_file)".into(),
            ));
        };
        let mut map = self.identified.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(c) = map.get(node_id) {
            return Ok(c.clone());
        }
        let name = format!("{node_id}.{}", a.identity_suffix);
        let verifier =
            NodeIdentityVerifier::new(a.fleet.clone(), &name).map_err(ProbeError::Connect)?;
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| ProbeError::Connect(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
        let client = edgeroute_http::client::https_client(&self.opts(), tls);
        if map.len() >= a.max_clients.max(1) {
            // Bounded: the registry holds at most that many announced nodes anyway.
            map.clear();
        }
        map.insert(node_id.to_owned(), client.clone());
        Ok(client)
    }

    fn fetch(&self, client: HttpClient, uri: http::Uri) -> ProbeFuture {
        let this = self.clone();
        Box::pin(async move {
            let timeout_ms = this.timeout.as_millis() as u64;
            let work = async {
                let req = http::Request::get(uri)
                    .header(http::header::USER_AGENT, "edgeroute-discovery")
                    .body(Full::new(Bytes::new()))
                    .map_err(|e| ProbeError::Connect(e.to_string()))?;
                let resp =
                    client.request(req).await.map_err(|e| ProbeError::Connect(source(&e)))?;
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

impl Probe for HttpProbe {
    fn probe(&self, uri: http::Uri) -> ProbeFuture {
        self.fetch(self.client.clone(), uri)
    }

    fn probe_target(&self, target: &ProbeTarget) -> ProbeFuture {
        if target.announced && target.health.scheme_str() == Some("https") {
            return match self.identified_client(&target.node_id) {
                Ok(c) => self.fetch(c, target.health.clone()),
                Err(e) => Box::pin(async move { Err(e) }),
            };
        }
        self.fetch(self.client.clone(), target.health.clone())
    }
}

impl HttpProbe {
    /// The client for a request to `node_id` at `uri` (an announced `https://` node's checks
    /// its certificate identity).
    pub(crate) fn client_for(
        &self,
        node_id: &str,
        announced: bool,
        uri: &http::Uri,
    ) -> Result<HttpClient, ProbeError> {
        if announced && uri.scheme_str() == Some("https") {
            return self.identified_client(node_id);
        }
        Ok(self.client.clone())
    }

    pub(crate) fn max_body(&self) -> usize {
        self.max_body
    }
}

pub(crate) fn source(e: &hyper_util::client::legacy::Error) -> String {
    let mut s = e.to_string();
    let mut cur: Option<&dyn std::error::Error> = std::error::Error::source(e);
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// What a finished probe reports: node id, the URL probed, when it was sent, when it ended,
/// the outcome.
pub type Sink =
    Arc<dyn Fn(&str, &str, Duration, Duration, Result<NodeHealth, ProbeError>) + Send + Sync>;

/// Probes started and skipped (over the announced nodes' budget), since the scheduler began.
#[derive(Debug, Default)]
pub struct ProbeCounts {
    pub started: AtomicU64,
    pub skipped: AtomicU64,
}

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
    budget: Arc<Mutex<ProbeBudget>>,
    counts: Arc<ProbeCounts>,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler").field("nodes", &self.tasks.len()).finish_non_exhaustive()
    }
}

/// A stable phase in `[0, interval)` for `id` (FNV-1a), spreading probes over the interval.
pub(crate) fn phase(id: &str, interval: Duration) -> Duration {
    let h = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let ms = interval.as_millis().max(1) as u64;
    Duration::from_millis(h % ms)
}

impl Scheduler {
    /// A scheduler whose announced nodes share `announced_per_s` probes a second.
    pub fn new(
        probe: Arc<dyn Probe>,
        interval: Duration,
        started: Instant,
        sink: Sink,
        announced_per_s: u32,
    ) -> Self {
        Scheduler {
            probe,
            interval,
            sink,
            started,
            tasks: HashMap::new(),
            budget: Arc::new(Mutex::new(ProbeBudget::new(announced_per_s))),
            counts: Arc::default(),
        }
    }

    pub fn counts(&self) -> Arc<ProbeCounts> {
        self.counts.clone()
    }

    /// Probes `id` at `url` from now on (at once, then on its schedule). A changed URL
    /// restarts the task; an unchanged one only asks for an immediate probe. `announced`
    /// probes draw from the shared budget.
    pub fn ensure(&mut self, id: &str, url: &str, announced: bool) {
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
                url,
                self.started.elapsed(),
                self.started.elapsed(),
                Err(ProbeError::Connect(format!("cannot probe `{url}`: not an http(s):// URL"))),
            );
            return;
        };
        let kick = Arc::new(Notify::new());
        let target = ProbeTarget { node_id: id.to_owned(), health: uri, announced };
        let handle = tokio::spawn(run(
            target,
            url.to_owned(),
            self.probe.clone(),
            self.interval,
            self.started,
            self.sink.clone(),
            kick.clone(),
            announced.then(|| (self.budget.clone(), self.counts.clone())),
            self.counts.clone(),
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

type Budget = (Arc<Mutex<ProbeBudget>>, Arc<ProbeCounts>);

#[allow(clippy::too_many_arguments)] // One task's whole context, passed once.
async fn run(
    target: ProbeTarget,
    url: String,
    probe: Arc<dyn Probe>,
    interval: Duration,
    started: Instant,
    sink: Sink,
    kick: Arc<Notify>,
    budget: Option<Budget>,
    counts: Arc<ProbeCounts>,
) {
    let id = target.node_id.clone();
    let mut ticks = tokio::time::interval_at(Instant::now() + phase(&id, interval), interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        let sent = started.elapsed();
        let allowed = match &budget {
            None => true,
            Some((b, c)) => {
                let ok = b.lock().map(|mut b| b.try_take(sent)).unwrap_or(false);
                if !ok {
                    c.skipped.fetch_add(1, Ordering::Relaxed);
                }
                ok
            }
        };
        if allowed {
            counts.started.fetch_add(1, Ordering::Relaxed);
            let outcome = probe.probe_target(&target).await;
            sink(&id, &url, sent, started.elapsed(), outcome);
        }
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
    fn the_announced_budget_refills_at_its_rate_and_never_holds_more_than_a_second() {
        let s = Duration::from_secs;
        let mut b = ProbeBudget::new(10);
        let taken = (0..100).filter(|_| b.try_take(s(0))).count();
        assert_eq!(taken, 10, "a full bucket, then nothing");
        assert!(!b.try_take(Duration::from_millis(50)));
        assert!(b.try_take(Duration::from_millis(100)), "one token per 100 ms");
        // A long quiet spell refills one second's worth, no more.
        let taken = (0..100).filter(|_| b.try_take(s(3600))).count();
        assert_eq!(taken, 10);
        // Time going backwards (it never does) grants nothing.
        assert!(!b.try_take(s(10)));
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
