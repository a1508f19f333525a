//! The routing architectures under comparison, each as the client side of one turn.
//!
//! - [`Gslb`]: DNS-style global load balancing — a static geographic map from the resolver's
//!   region to that region's nodes, health-checked every 10 s (3 failures to mark a node
//!   down), answers cached by the ISP's resolver and the device for their 30 s TTL; the client
//!   tries the answer's addresses in order.
//! - [`Central`]: one router in Toronto that every request goes through; it picks the node
//!   with the fewest outstanding requests, retries another on a connect error or a missing
//!   answer, and benches a failing node for 10 s (nginx's `max_fails=1 fail_timeout=10s`).
//! - the oracle ([`oracle_pick`]): knows every true path delay, every node's queue and every
//!   death the moment it happens, and sends each request straight to the best node.
//! - edgeroute: the SDK itself (driven in `super`).
//!
//! The three baselines share one plain HTTP client ([`attempt`]) with the same limits the SDK
//! is given: 1 s to connect, 3 s to the first token, 500 ms of silence between tokens.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use edgeroute_http::ApiError;
use edgeroute_proto::{Fault, Side};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

use super::world::{NODES, SLOTS, Site, TOKENS_PER_S, Tap, has_token};
use crate::memnet::MemNet;

/// What the caller hears during one turn, across its attempts.
#[derive(Debug, Clone)]
pub struct Ear {
    pub start: Instant,
    last: Instant,
    pub longest_silence: Duration,
    pub first_token: Option<Instant>,
}

impl Ear {
    pub fn starting_now() -> Ear {
        let now = Instant::now();
        Ear { start: now, last: now, longest_silence: Duration::ZERO, first_token: None }
    }

    /// A token reached the caller now.
    pub fn heard(&mut self) {
        let now = Instant::now();
        self.longest_silence = self.longest_silence.max(now - self.last);
        self.last = now;
        self.first_token.get_or_insert(now);
    }

    /// The turn gave up now: the silence since the last token counts.
    pub fn gave_up(&mut self) {
        self.longest_silence = self.longest_silence.max(Instant::now() - self.last);
    }
}

/// The baselines' client limits (the SDK gets the same).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub connect: Duration,
    pub first_token: Duration,
    pub stall: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connect: Duration::from_secs(1),
            first_token: Duration::from_secs(3),
            stall: Duration::from_millis(500),
        }
    }
}

/// Why an attempt failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AttemptError {
    #[error("connect: {0}")]
    Connect(String),
    #[error("no first token in time")]
    FirstToken,
    #[error("stalled")]
    Stalled,
    /// A non-2xx answer and its classification (the node's `x-edgeroute-error`, else its
    /// status's).
    #[error("HTTP {status} ({fault})")]
    Status { status: u16, fault: Fault },
    #[error("cut: {0}")]
    Cut(String),
}

/// A non-2xx answer as an attempt's error, classified.
fn status_error<B>(resp: &http::Response<B>) -> AttemptError {
    let said = resp.headers().get(edgeroute_proto::ERROR_HEADER).and_then(|v| v.to_str().ok());
    let status = resp.status().as_u16();
    AttemptError::Status { status, fault: Fault::of_answer(status, said) }
}

/// A new HTTP/1 connection to `host` on `net` (connect bounded by `connect`), for `path`.
pub(super) async fn open(
    net: &MemNet,
    host: &str,
    path: &str,
    connect: Duration,
) -> Result<(http::Uri, hyper::client::conn::http1::SendRequest<Full<Bytes>>), AttemptError> {
    let failed = |e: String| AttemptError::Connect(e);
    let uri: http::Uri = format!("http://{host}{path}")
        .parse()
        .map_err(|e: http::uri::InvalidUri| failed(e.to_string()))?;
    let io = tokio::time::timeout(connect, edgeroute_client::Transport::connect(net, &uri))
        .await
        .map_err(|_| failed("timed out".into()))?
        .map_err(|e| failed(e.to_string()))?;
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| failed(e.to_string()))?;
    tokio::spawn(conn);
    Ok((uri, send))
}

/// One streamed chat request to `host` on `net` (a node, or the central router), read to its
/// `[DONE]` with the limits; each token is told to `ear`. Returns the serving node's id.
pub async fn attempt(
    net: &MemNet,
    host: &str,
    body: Bytes,
    limits: Limits,
    ear: &mut Ear,
) -> Result<String, AttemptError> {
    let (uri, mut send) = open(net, host, "/v1/chat/completions", limits.connect).await?;
    let req = http::Request::post(uri.path())
        .header(http::header::HOST, host)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(body))
        .map_err(|e| AttemptError::Connect(e.to_string()))?;
    let started = Instant::now();
    let first_deadline = started + limits.first_token;
    let resp = tokio::time::timeout_at(first_deadline, send.send_request(req))
        .await
        .map_err(|_| AttemptError::FirstToken)?
        .map_err(|e| AttemptError::Cut(e.to_string()))?;
    if !resp.status().is_success() {
        return Err(status_error(&resp));
    }
    let node = resp
        .headers()
        .get(edgeroute_proto::headers::NODE_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let mut body = resp.into_body();
    let mut got_token = false;
    let mut last = started;
    loop {
        let deadline = if got_token { last + limits.stall } else { first_deadline };
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) if got_token => return Err(AttemptError::Stalled),
            Err(_) => return Err(AttemptError::FirstToken),
            Ok(None) => return Err(AttemptError::Cut("ended without [DONE]".into())),
            Ok(Some(Err(e))) => return Err(AttemptError::Cut(e.to_string())),
            Ok(Some(Ok(f))) => f,
        };
        let Some(data) = frame.data_ref() else { continue };
        if has_token(data) {
            got_token = true;
            last = Instant::now();
            ear.heard();
        }
        if data.windows(12).any(|w| w == b"data: [DONE]") {
            return Ok(node);
        }
    }
}

/// DNS-style global load balancing, seen from the sites' resolvers.
#[derive(Debug)]
pub struct Gslb {
    alive: Arc<[AtomicBool; NODES.len()]>,
    healthy: Mutex<[bool; NODES.len()]>,
    fails: Mutex<[u32; NODES.len()]>,
    rotation: AtomicUsize,
    /// Per site: the resolver's cached answer and when it expires.
    cache: Mutex<std::collections::HashMap<&'static str, (Instant, Vec<usize>)>>,
}

/// DNS record TTL.
pub const DNS_TTL: Duration = Duration::from_secs(30);
/// Health check interval of the DNS service, and failures to mark a node down.
pub const DNS_CHECK_EVERY: Duration = Duration::from_secs(10);
pub const DNS_CHECK_FAILURES: u32 = 3;
/// Device → ISP resolver round trip, and resolver → authoritative (on a resolver miss).
const RESOLVER_RTT: Duration = Duration::from_millis(3);
const AUTHORITATIVE_RTT: Duration = Duration::from_millis(30);

impl Gslb {
    /// Starts the health checker (a task that ends with `stop`).
    pub fn start(
        alive: Arc<[AtomicBool; NODES.len()]>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> Arc<Gslb> {
        let g = Arc::new(Gslb {
            alive,
            healthy: Mutex::new([true; NODES.len()]),
            fails: Mutex::new([0; NODES.len()]),
            rotation: AtomicUsize::new(0),
            cache: Mutex::default(),
        });
        let checker = g.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(DNS_CHECK_EVERY);
            loop {
                tokio::select! {
                    _ = stop.changed() => return,
                    _ = tick.tick() => checker.check(),
                }
            }
        });
        g
    }

    fn check(&self) {
        let (Ok(mut healthy), Ok(mut fails)) = (self.healthy.lock(), self.fails.lock()) else {
            return;
        };
        for i in 0..NODES.len() {
            if self.alive[i].load(Ordering::SeqCst) {
                fails[i] = 0;
                healthy[i] = true;
            } else {
                fails[i] += 1;
                if fails[i] >= DNS_CHECK_FAILURES {
                    healthy[i] = false;
                }
            }
        }
    }

    /// A device at `site` resolves the service name: the nodes of the resolver's region
    /// (healthy ones, rotated), and when the answer expires. Waits the lookup's round trips.
    pub async fn resolve(&self, site: &Site) -> (Instant, Vec<usize>) {
        tokio::time::sleep(RESOLVER_RTT).await;
        let cached = self.cache.lock().ok().and_then(|c| c.get(site.name).cloned());
        if let Some((expires, answer)) = cached
            && expires > Instant::now()
        {
            return (expires, answer);
        }
        tokio::time::sleep(AUTHORITATIVE_RTT).await;
        let healthy = self.healthy.lock().map(|h| *h).unwrap_or([true; NODES.len()]);
        let mut answer: Vec<usize> =
            (0..NODES.len()).filter(|i| NODES[*i].region == site.region && healthy[*i]).collect();
        if !answer.is_empty() {
            let k = self.rotation.fetch_add(1, Ordering::Relaxed) % answer.len();
            answer.rotate_left(k);
        }
        let expires = Instant::now() + DNS_TTL;
        if let Ok(mut c) = self.cache.lock() {
            c.insert(site.name, (expires, answer.clone()));
        }
        (expires, answer)
    }
}

/// The central router's host name, and its region.
pub const ROUTER_HOST: &str = "router";
pub const ROUTER_REGION: &str = "toronto";
/// How long the router benches a node that failed.
const ROUTER_BENCH: Duration = Duration::from_secs(10);

/// One router in one region that every request goes through.
#[derive(Debug)]
pub struct Central {
    /// The network seen from the router's region.
    net: MemNet,
    outstanding: [AtomicUsize; NODES.len()],
    benched: Mutex<[Option<Instant>; NODES.len()]>,
    rotation: AtomicUsize,
    limits: Limits,
}

impl Central {
    /// Serves as [`ROUTER_HOST`] on `net` until `stop`.
    pub fn start(
        net: &MemNet,
        limits: Limits,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> Arc<Central> {
        let c = Arc::new(Central {
            net: net.from(&format!("region:{ROUTER_REGION}")),
            outstanding: std::array::from_fn(|_| AtomicUsize::new(0)),
            benched: Mutex::new([None; NODES.len()]),
            rotation: AtomicUsize::new(0),
            limits,
        });
        let app = axum::Router::new().fallback(route).with_state(c.clone());
        let listener = net.bind(ROUTER_HOST);
        for site in super::world::SITES {
            net.set_path(
                site.name,
                ROUTER_HOST,
                crate::memnet::PathSpec::rtt_ms(
                    site.rtt_ms(ROUTER_REGION),
                    super::world::JITTER_MS,
                ),
            );
        }
        tokio::spawn(edgeroute_http::serve(
            listener,
            app,
            edgeroute_http::ServerLimits::default(),
            None,
            async move {
                let _ = stop.wait_for(|s| *s).await;
            },
        ));
        c
    }

    /// Fewest outstanding requests among the nodes not benched and not tried; ties in turn.
    fn pick(&self, tried: &[usize]) -> Option<usize> {
        let now = Instant::now();
        let benched = self.benched.lock().map(|b| *b).unwrap_or([None; NODES.len()]);
        let start = self.rotation.fetch_add(1, Ordering::Relaxed);
        (0..NODES.len())
            .map(|k| (start + k) % NODES.len())
            .filter(|i| !tried.contains(i) && benched[*i].is_none_or(|until| until <= now))
            .min_by_key(|i| self.outstanding[*i].load(Ordering::SeqCst))
    }

    fn bench(&self, node: usize) {
        if let Ok(mut b) = self.benched.lock() {
            b[node] = Some(Instant::now() + ROUTER_BENCH);
        }
    }
}

struct Outstanding(Arc<Central>, usize);

impl Drop for Outstanding {
    fn drop(&mut self) {
        self.0.outstanding[self.1].fetch_sub(1, Ordering::SeqCst);
    }
}

async fn route(State(c): State<Arc<Central>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, 1 << 20).await else {
        return ApiError::invalid_request(None, "unreadable body").into_response();
    };
    let mut tried = Vec::new();
    while tried.len() < 3 {
        let Some(i) = c.pick(&tried) else { break };
        tried.push(i);
        c.outstanding[i].fetch_add(1, Ordering::SeqCst);
        let guard = Outstanding(c.clone(), i);
        match forward(&c, i, &parts, bytes.clone()).await {
            Ok(resp) => {
                let (p, b) = resp.into_parts();
                let body = b.map_frame(move |f| {
                    let _ = &guard;
                    f
                });
                return Response::from_parts(p, Body::new(body));
            }
            Err(_) => c.bench(i),
        }
    }
    ApiError::new(
        http::StatusCode::BAD_GATEWAY,
        "api_error",
        Some("no_node_available"),
        "no node answered",
    )
    .fault(Side::Fleet, true)
    .into_response()
}

/// Forwards to node `i`: connect and answer-head timeouts, as a proxy's upstream settings.
async fn forward(
    c: &Central,
    i: usize,
    parts: &http::request::Parts,
    body: Bytes,
) -> Result<http::Response<hyper::body::Incoming>, AttemptError> {
    let host = NODES[i].id;
    let (uri, mut send) = open(&c.net, host, parts.uri.path(), c.limits.connect).await?;
    let mut req = http::Request::post(uri.path()).header(http::header::HOST, host);
    for (k, v) in &parts.headers {
        if k != http::header::HOST && k != http::header::CONTENT_LENGTH {
            req = req.header(k, v);
        }
    }
    let req = req.body(Full::new(body)).map_err(|e| AttemptError::Connect(e.to_string()))?;
    let resp = tokio::time::timeout(c.limits.first_token, send.send_request(req))
        .await
        .map_err(|_| AttemptError::FirstToken)?
        .map_err(|e| AttemptError::Cut(e.to_string()))?;
    // A well-configured proxy moves on when the node says another may answer: a 5xx, full,
    // or no longer holding the model (as nginx's `proxy_next_upstream error http_5xx
    // http_404`); the request's own refusal goes back to the caller.
    if !resp.status().is_success() {
        let e = status_error(&resp);
        if matches!(e, AttemptError::Status { fault, .. } if fault.retry) {
            return Err(e);
        }
    }
    Ok(resp)
}

/// The oracle's choice for a request from `site`: the live node, not in `tried`, with the
/// lowest true expected time to first token — path round trip, the node's own first-token
/// time, and the wait its true queue implies.
pub fn oracle_pick(
    site: &Site,
    alive: &dyn Fn(usize) -> bool,
    tap: &Tap,
    max_tokens: u32,
    tried: &[usize],
) -> Option<usize> {
    (0..NODES.len())
        .filter(|i| alive(*i) && !tried.contains(i))
        .map(|i| {
            (i, expected_ttft_ms(site, i, tap.in_flight[i].load(Ordering::SeqCst), max_tokens))
        })
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(i, _)| i)
}

/// True expected time to first token on node `i` from `site` with `in_flight` requests there.
pub fn expected_ttft_ms(site: &Site, i: usize, in_flight: usize, max_tokens: u32) -> f64 {
    let n = NODES[i];
    let service_ms = n.ttft_ms as f64 + f64::from(max_tokens) * 1000.0 / TOKENS_PER_S;
    let ahead = (in_flight + 1).saturating_sub(SLOTS) as f64;
    site.rtt_ms(n.region) + n.ttft_ms as f64 + ahead * service_ms / SLOTS as f64
}

/// The best node for `site` on an idle fleet among the live ones: the yardstick of "share on
/// the truly best node".
pub fn best_node(site: &Site, alive: &dyn Fn(usize) -> bool) -> Option<usize> {
    (0..NODES.len()).filter(|i| alive(*i)).min_by(|a, b| {
        expected_ttft_ms(site, *a, 0, 0).total_cmp(&expected_ttft_ms(site, *b, 0, 0))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::world::SITES;

    #[test]
    fn the_oracle_weighs_path_node_speed_and_true_queues() {
        let tap = Tap::default();
        let all = |_: usize| true;
        let [van, tor, mtl, congested] = SITES;
        assert_eq!(oracle_pick(&tor, &all, &tap, 24, &[]), Some(2), "tor-1: 3 + 15 ms");
        assert_eq!(
            oracle_pick(&mtl, &all, &tap, 24, &[]),
            Some(2),
            "tor-1: 9 + 15 < mtl-1: 3 + 25"
        );
        assert_eq!(
            oracle_pick(&van, &all, &tap, 24, &[]),
            Some(0),
            "van-1: 3 + 45 < tor-1: 60 + 15"
        );
        assert_eq!(
            oracle_pick(&congested, &all, &tap, 24, &[]),
            Some(4),
            "mtl-1: 9 + 25 < tor-1: 53 + 15"
        );
        // A full tor-1 (4 slots busy, 4 waiting) is worse than tor-2 for a Toronto caller.
        tap.in_flight[2].store(8, Ordering::SeqCst);
        assert_eq!(oracle_pick(&tor, &all, &tap, 24, &[]), Some(3));
        // The dead and the tried are never picked.
        let no_mtl1 = |i: usize| i != 4;
        assert_eq!(oracle_pick(&tor, &no_mtl1, &tap, 24, &[3]), Some(5));
        assert_eq!(best_node(&tor, &all), Some(2));
        assert_eq!(best_node(&tor, &|i| i != 2), Some(3));
    }

    #[tokio::test(start_paused = true)]
    async fn dns_answers_the_resolvers_region_until_health_checks_fail_three_times() {
        let alive: Arc<[AtomicBool; NODES.len()]> =
            Arc::new(std::array::from_fn(|_| AtomicBool::new(true)));
        let (_stop, stopped) = tokio::sync::watch::channel(false);
        let g = Gslb::start(alive.clone(), stopped);
        let congested = SITES[3];
        let t = Instant::now();
        let (expires, a) = g.resolve(&congested).await;
        assert_eq!(t.elapsed(), RESOLVER_RTT + AUTHORITATIVE_RTT, "a resolver miss");
        assert_eq!(expires, Instant::now() + DNS_TTL);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, vec![2, 3], "Toronto's nodes, by the resolver's location");
        let t = Instant::now();
        assert_eq!(g.resolve(&congested).await.1, a, "cached: the same answer");
        assert_eq!(t.elapsed(), RESOLVER_RTT);
        // tor-1 dies at 15 s: checks at 20 s and 30 s fail, so the answer refreshed at 30 s
        // still lists it, for another TTL; the third failure (40 s) shows at the next refresh.
        tokio::time::sleep(Duration::from_secs(15)).await;
        alive[2].store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(16)).await;
        let (_, a) = g.resolve(&congested).await;
        assert!(a.contains(&2), "2 failed checks: still listed, {a:?}");
        tokio::time::sleep(DNS_TTL).await;
        assert_eq!(g.resolve(&congested).await.1, vec![3]);
    }
}
