//! The emulated world every strategy runs in: six simulator nodes in three regions, a
//! discovery replica per region on the embedded bus, and client sites, all on one in-memory
//! network ([`MemNet`]) whose paths carry real-geography delays.
//!
//! Each node's gateway is wrapped by a tap that sees, per request, when it arrived and when
//! its first token left, and keeps the node's true in-flight count: the ground truth the
//! oracle routes by and the report measures routing overhead against.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, SizeHint};
use tokio::time::Instant;

use crate::fleet::{FleetBackend, FleetSpec};
use crate::memnet::{Fault, MemNet, PathSpec};
use crate::wan::geo_rtt_ms;

/// The fleet, as in `edgeroute-lab demo` ([`crate::fleet::CANADA`]): the fastest node is in
/// Toronto. Each node's id is also its host name.
pub use crate::fleet::{CANADA as NODES, CANADA_REGIONS as REGIONS};

/// Decode speed of every node, tokens per second.
pub const TOKENS_PER_S: f64 = 400.0;
/// Concurrency slots per node (the simulator's one GPU).
pub const SLOTS: usize = 4;

/// Where a client sits: its ISP's region (where its DNS resolver is, and its home region for
/// edgeroute) and, for a congested ISP, the extra round trip on its path into that region's
/// data centres.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Site {
    pub name: &'static str,
    pub region: &'static str,
    /// Added to the round trip to every host in `region`, ms.
    pub congestion_ms: f64,
}

pub const SITES: [Site; 4] = [
    Site { name: "vancouver", region: "vancouver", congestion_ms: 0.0 },
    Site { name: "toronto", region: "toronto", congestion_ms: 0.0 },
    Site { name: "montreal", region: "montreal", congestion_ms: 0.0 },
    // A Toronto ISP whose peering into Toronto's data centres is saturated: its nearest nodes
    // are 53 ms away, Montreal's 9 ms.
    Site { name: "toronto-congested", region: "toronto", congestion_ms: 50.0 },
];

impl Site {
    pub fn by_name(name: &str) -> Option<Site> {
        SITES.iter().copied().find(|s| s.name == name)
    }

    /// Round trip from this site to a host in `region`, ms.
    pub fn rtt_ms(&self, region: &str) -> f64 {
        let extra = if region == self.region { self.congestion_ms } else { 0.0 };
        geo_rtt_ms(self.region, region) + extra
    }
}

/// Jitter on every path, ms.
pub const JITTER_MS: f64 = 0.5;

/// The discovery replicas' host names, per region.
pub use crate::fleet::discovery_id as discovery_host;

/// One request as the node saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub node: usize,
    pub arrived: Instant,
    pub first_token: Option<Instant>,
}

/// What the taps saw, by the request's `user` field (the harness's turn id).
#[derive(Debug, Default)]
pub struct Tap {
    pub seen: Mutex<HashMap<String, Vec<Seen>>>,
    /// True in-flight chat requests per node.
    pub in_flight: [AtomicUsize; NODES.len()],
}

impl Tap {
    pub fn requests(&self, user: &str) -> Vec<Seen> {
        self.seen.lock().map(|m| m.get(user).cloned().unwrap_or_default()).unwrap_or_default()
    }
}

/// A running world; dropping it stops its servers.
pub struct World {
    pub net: MemNet,
    pub tap: Arc<Tap>,
    alive: Arc<[AtomicBool; NODES.len()]>,
    /// The LLM is loaded on each node.
    loaded: [AtomicBool; NODES.len()],
    stop: tokio::sync::watch::Sender<bool>,
}

impl std::fmt::Debug for World {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("World").finish_non_exhaustive()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

impl World {
    /// Starts the nodes and the discovery replicas, and lays every path: from each site to
    /// each node and replica, from each replica to each node, and between regions (a central
    /// router's links) with `region:<name>` as the source.
    pub async fn start(seed: u64) -> Result<World> {
        let net = MemNet::seeded(seed);
        let tap = Arc::new(Tap::default());
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let bus = edgeroute_bus::Bus::embedded(&edgeroute_bus::BusConfig::embedded())?;
        let hosts: Vec<(String, &str)> = NODES
            .iter()
            .map(|n| (n.id.to_owned(), n.region))
            .chain(REGIONS.iter().map(|r| (discovery_host(r), *r)))
            .collect();
        for (host, region) in &hosts {
            for site in SITES {
                net.set_path(site.name, host, PathSpec::rtt_ms(site.rtt_ms(region), JITTER_MS));
            }
            for from in REGIONS {
                let rtt = geo_rtt_ms(from, region);
                net.set_path(&format!("region:{from}"), host, PathSpec::rtt_ms(rtt, JITTER_MS));
            }
        }
        let fleet = FleetSpec {
            seed,
            seed_per_node: true,
            backend: FleetBackend::Sim {
                tokens_per_s: TOKENS_PER_S,
                prefill_us_per_token: 0,
                spare_gpu: false,
            },
            ..FleetSpec::canada().llm_only()
        };
        for (i, spec) in NODES.iter().enumerate() {
            let cfg = fleet.node_config(i, Some(format!("http://{}", spec.id)));
            let t = tap.clone();
            let node = edgeroute_node::Node::build(cfg)?.with_bus(bus.clone()).wrap_router(
                Arc::new(move |r: axum::Router| {
                    r.layer(axum::middleware::from_fn_with_state((t.clone(), i), tap_layer))
                }),
            );
            let listener = net.bind(spec.id);
            // The operator's plane: the fleet runs without [auth], so admin routes are served
            // only on a listener of their own (a loopback one, on a real machine).
            let admin = net.bind(&admin_host(spec.id));
            let mut stopped = stopped.clone();
            tokio::spawn(node.serve_planes(listener, Some(admin), async move {
                let _ = stopped.wait_for(|s| *s).await;
            }));
        }
        for region in REGIONS {
            let probe = MemProbe {
                net: net.from(&format!("region:{region}")),
                timeout: Duration::from_millis(200),
            };
            let d = edgeroute_discovery::Discovery::build(fleet.discovery_config(region))?
                .with_bus(bus.clone())
                .with_probe(Arc::new(probe));
            let listener = net.bind(&discovery_host(region));
            let mut stopped = stopped.clone();
            tokio::spawn(d.serve(listener, async move {
                let _ = stopped.wait_for(|s| *s).await;
            }));
        }
        let alive = Arc::new(std::array::from_fn(|_| AtomicBool::new(true)));
        let loaded = std::array::from_fn(|_| AtomicBool::new(true));
        Ok(World { net, tap, alive, loaded, stop })
    }

    pub fn alive(&self, node: usize) -> bool {
        self.alive[node].load(Ordering::SeqCst)
    }

    /// The node is up and has the model.
    pub fn serves(&self, node: usize) -> bool {
        self.alive(node) && self.loaded[node].load(Ordering::SeqCst)
    }

    /// An operator unloads the LLM on the node (`POST /v1/models/unload` on its admin plane):
    /// the node stays up.
    pub async fn unload(&self, node: usize) -> Result<()> {
        self.loaded[node].store(false, Ordering::SeqCst);
        let net = self.net.from("region:toronto");
        let host = &admin_host(NODES[node].id);
        let (uri, mut send) =
            super::strategy::open(&net, host, "/v1/models/unload", Duration::from_secs(1))
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        let req = http::Request::post(uri.path())
            .header(http::header::HOST, host)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from_static(br#"{"model": "sim-llama"}"#)))?;
        let res = send.send_request(req).await?;
        let status = res.status();
        let body = res.into_body().collect().await?.to_bytes();
        anyhow::ensure!(
            status.is_success(),
            "unload on {host}: {status} {}",
            String::from_utf8_lossy(&body)
        );
        Ok(())
    }

    /// The node dies as a remote machine does: black-holed, open streams go silent.
    pub fn kill(&self, node: usize) {
        self.alive[node].store(false, Ordering::SeqCst);
        self.net.set_fault(NODES[node].id, Fault::Blackhole);
    }

    /// Requests each node has seen so far.
    pub fn served(&self) -> [usize; NODES.len()] {
        let mut out = [0; NODES.len()];
        if let Ok(seen) = self.tap.seen.lock() {
            for s in seen.values().flatten() {
                out[s.node] += 1;
            }
        }
        out
    }

    /// Warms every node up as live traffic would have: `n` streamed answers each (from
    /// Toronto), so their telemetry holds real first-token times when the run starts.
    pub async fn warm_up(&self, n: usize) -> Result<()> {
        let net = self.net.from("region:toronto");
        for node in NODES {
            for _ in 0..n {
                let body = serde_json::json!({
                    "model": "sim-llama",
                    "messages": [{"role": "user", "content": "warm up"}],
                    "max_tokens": 4,
                    "stream": true,
                });
                let mut ear = super::strategy::Ear::starting_now();
                super::strategy::attempt(
                    &net,
                    node.id,
                    Bytes::from(body.to_string()),
                    super::strategy::Limits::default(),
                    &mut ear,
                )
                .await
                .with_context(|| format!("warming {} up", node.id))?;
            }
        }
        Ok(())
    }

    /// A handle to the liveness flags (for a DNS health checker's task).
    pub fn liveness(&self) -> Arc<[AtomicBool; NODES.len()]> {
        self.alive.clone()
    }
}

pub fn node_index(id: &str) -> Option<usize> {
    NODES.iter().position(|n| n.id == id)
}

/// Discovery's health probes over the in-memory network.
#[derive(Debug)]
struct MemProbe {
    net: MemNet,
    timeout: Duration,
}

impl edgeroute_discovery::probe::Probe for MemProbe {
    fn probe(&self, uri: http::Uri) -> edgeroute_discovery::probe::ProbeFuture {
        use edgeroute_discovery::probe::ProbeError;
        let (net, timeout) = (self.net.clone(), self.timeout);
        Box::pin(async move {
            let work = async {
                let host = uri.host().unwrap_or_default();
                let (_, mut send) = super::strategy::open(&net, host, uri.path(), timeout)
                    .await
                    .map_err(|e| ProbeError::Connect(e.to_string()))?;
                let req = http::Request::get(uri.path())
                    .header(http::header::HOST, host)
                    .body(Full::new(Bytes::new()))
                    .map_err(|e| ProbeError::Connect(e.to_string()))?;
                let resp =
                    send.send_request(req).await.map_err(|e| ProbeError::Connect(e.to_string()))?;
                let status = resp.status();
                let body = resp
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| ProbeError::Body(e.to_string()))?
                    .to_bytes();
                serde_json::from_slice(&body).map_err(|_| ProbeError::Status(status.as_u16()))
            };
            tokio::time::timeout(timeout, work)
                .await
                .unwrap_or(Err(ProbeError::Timeout(timeout.as_millis() as u64)))
        })
    }
}

/// The tap: notes each chat request's arrival and first token under its `user` field, and
/// counts it in flight until its answer ends or is dropped.
async fn tap_layer(
    State((tap, node)): State<(Arc<Tap>, usize)>,
    req: Request,
    next: Next,
) -> Response {
    if req.uri().path() != "/v1/chat/completions" {
        return next.run(req).await;
    }
    let arrived = Instant::now();
    let (parts, body) = req.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, 1 << 20).await else {
        return next.run(Request::from_parts(parts, Body::empty())).await;
    };
    let user = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| v.get("user")?.as_str().map(str::to_owned));
    let guard = InFlight::new(tap.clone(), node);
    let resp = next.run(Request::from_parts(parts, Body::from(bytes))).await;
    let Some(user) = user else { return resp };
    let slot = {
        let mut seen = tap.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let v = seen.entry(user.clone()).or_default();
        v.push(Seen { node, arrived, first_token: None });
        v.len() - 1
    };
    let (parts, body) = resp.into_parts();
    Response::from_parts(
        parts,
        Body::new(TapBody { inner: body, tap, user, slot, seen_token: false, _guard: guard }),
    )
}

struct InFlight {
    tap: Arc<Tap>,
    node: usize,
}

impl InFlight {
    fn new(tap: Arc<Tap>, node: usize) -> InFlight {
        tap.in_flight[node].fetch_add(1, Ordering::SeqCst);
        InFlight { tap, node }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.tap.in_flight[self.node].fetch_sub(1, Ordering::SeqCst);
    }
}

struct TapBody {
    inner: Body,
    tap: Arc<Tap>,
    user: String,
    slot: usize,
    seen_token: bool,
    _guard: InFlight,
}

impl hyper::body::Body for TapBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Ok(frame))) = &polled
            && !self.seen_token
            && frame.data_ref().is_some_and(|d| has_token(d))
        {
            self.seen_token = true;
            let now = Instant::now();
            if let Ok(mut seen) = self.tap.seen.lock()
                && let Some(s) = seen.get_mut(&self.user).and_then(|v| v.get_mut(self.slot))
            {
                s.first_token = Some(now);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Whether an SSE chunk (or a JSON answer) carries text: a non-empty `"content"`.
pub fn has_token(chunk: &[u8]) -> bool {
    const KEY: &[u8] = b"\"content\":\"";
    chunk
        .windows(KEY.len())
        .enumerate()
        .any(|(i, w)| w == KEY && chunk.get(i + KEY.len()).is_some_and(|b| *b != b'"'))
}

/// Where node `id` serves its admin plane on the lab's network.
fn admin_host(id: &str) -> String {
    format!("{id}-admin")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sites_see_real_geography_and_the_congested_isp_its_detour() {
        let tor = Site::by_name("toronto").unwrap_or(SITES[1]);
        assert_eq!(tor.rtt_ms("toronto"), 3.0);
        assert_eq!(tor.rtt_ms("montreal"), 9.0);
        assert_eq!(tor.rtt_ms("vancouver"), 60.0);
        let c = Site::by_name("toronto-congested").unwrap_or(SITES[3]);
        assert_eq!(c.rtt_ms("toronto"), 53.0);
        assert_eq!(c.rtt_ms("montreal"), 9.0, "nearest is not fastest");
    }

    #[test]
    fn a_token_is_non_empty_content() {
        assert!(has_token(br#"data: {"choices":[{"delta":{"content":"Hi"}}]}"#));
        assert!(!has_token(br#"data: {"choices":[{"delta":{"role":"assistant","content":""}}]}"#));
        assert!(!has_token(b"data: [DONE]"));
    }
}
