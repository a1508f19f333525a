//! The real fleet and store behind the driver: discovery's `/v1/topology` (an admin token),
//! each node's admin API (`/v1/models/load`, `/v1/models/unload`), `/health` and `/metrics`,
//! chat completions for the correctness probes, and the policy and the rollout's state on the
//! topology bus.
//!
//! Tokens: an admin one with the fleet audience (`edgeroute token mint --scope admin --fleet`)
//! for discovery and the nodes' admin API, an inference one for the probes; either goes only
//! over https or to loopback.

use std::time::Duration;

use bytes::Bytes;
use edgeroute_bus::{Bus, BusError, PolicyResult};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;

use crate::driver::{Counters, Fleet, FleetNode, SaveError, StateStore, parse_metrics};

/// Every request's deadline (a load's wait for readiness is polled within its own timeout).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest answer read from a node or discovery.
const MAX_BODY: usize = 16 << 20;

/// The fleet over HTTP and the bus.
#[derive(Clone)]
pub struct HttpFleet {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    discovery: String,
    token: String,
    /// The token correctness probes ask the nodes with (inference scope).
    inference_token: String,
    bus: Bus,
    /// Discovery replicas that must acknowledge each policy document.
    replicas: usize,
    /// How long a push waits for them.
    push_timeout: Duration,
    /// Nodes' admin routes on another port than the one they serve on (`admin.listen`).
    admin_port: Option<u16>,
    /// How often a load or an unload is checked on the node.
    check_every: Duration,
}

impl std::fmt::Debug for HttpFleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpFleet").field("discovery", &self.discovery).finish_non_exhaustive()
    }
}

/// What [`HttpFleet::new`] needs.
#[derive(Debug, Clone)]
pub struct HttpFleetConfig {
    pub discovery: String,
    /// Admin scope, fleet audience: discovery's topology and the nodes' admin API.
    pub token: String,
    /// Inference scope: the correctness probes (an admin token's fleet audience is not an
    /// inference token's). Default: `token`.
    pub inference_token: Option<String>,
    pub ca_file: Option<std::path::PathBuf>,
    pub replicas: usize,
    pub push_timeout: Duration,
    pub admin_port: Option<u16>,
    pub check_every: Duration,
}

fn is_loopback(url: &str) -> bool {
    url.parse::<http::Uri>()
        .ok()
        .and_then(|u| u.host().map(str::to_owned))
        .is_some_and(|h| matches!(h.as_str(), "127.0.0.1" | "localhost" | "[::1]" | "::1"))
}

impl HttpFleet {
    pub fn new(cfg: HttpFleetConfig, bus: Bus) -> Result<HttpFleet, String> {
        if !cfg.discovery.starts_with("https://") && !is_loopback(&cfg.discovery) {
            return Err(format!(
                "the admin token goes only over https (or to loopback): {}",
                cfg.discovery
            ));
        }
        let tls = edgeroute_http::client::tls_config(cfg.ca_file.as_deref())?;
        let client = edgeroute_http::client::https_client(
            &edgeroute_http::client::ClientOptions::default(),
            tls,
        );
        Ok(HttpFleet {
            client,
            discovery: cfg.discovery.trim_end_matches('/').to_owned(),
            inference_token: cfg.inference_token.as_deref().unwrap_or(&cfg.token).trim().to_owned(),
            token: cfg.token.trim().to_owned(),
            bus,
            replicas: cfg.replicas,
            push_timeout: cfg.push_timeout,
            admin_port: cfg.admin_port,
            check_every: cfg.check_every,
        })
    }

    async fn call(
        &self,
        method: http::Method,
        url: &str,
        body: Option<serde_json::Value>,
        token: Option<&str>,
    ) -> Result<(http::StatusCode, Bytes), String> {
        if token.is_some() && !url.starts_with("https://") && !is_loopback(url) {
            return Err(format!("a token goes only over https (or to loopback): {url}"));
        }
        let uri: http::Uri = url.parse().map_err(|_| format!("`{url}` is not a URL"))?;
        let mut req = http::Request::builder().method(method).uri(uri);
        if let Some(token) = token {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let body = match body {
            Some(b) => {
                req = req.header(http::header::CONTENT_TYPE, "application/json");
                Full::new(Bytes::from(b.to_string()))
            }
            None => Full::new(Bytes::new()),
        };
        let req = req.body(body).map_err(|e| e.to_string())?;
        let call = async {
            let res = self.client.request(req).await.map_err(|e| format!("{url}: {e}"))?;
            let status = res.status();
            let limited = http_body_util::Limited::new(res.into_body(), MAX_BODY);
            let bytes = limited.collect().await.map_err(|e| format!("{url}: {e}"))?.to_bytes();
            Ok::<_, String>((status, bytes))
        };
        tokio::time::timeout(CALL_TIMEOUT, call)
            .await
            .map_err(|_| format!("{url}: no answer within {CALL_TIMEOUT:?}"))?
    }

    fn admin_url(&self, node: &FleetNode, path: &str) -> String {
        let base = node.url.trim_end_matches('/');
        match (self.admin_port, base.parse::<http::Uri>()) {
            (Some(port), Ok(u)) => {
                let scheme = u.scheme_str().unwrap_or("http");
                let host = u.host().unwrap_or("127.0.0.1");
                format!("{scheme}://{host}:{port}{path}")
            }
            _ => format!("{base}{path}"),
        }
    }

    /// The model's state on the node (`/health`): `None` when it does not hold it.
    async fn model_state(&self, node: &FleetNode, model: &str) -> Result<Option<String>, String> {
        let url = format!("{}/health", node.url.trim_end_matches('/'));
        let (_, body) = self.call(http::Method::GET, &url, None, None).await?;
        let h: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| format!("{url}: not JSON: {e}"))?;
        Ok(h["models"].as_array().and_then(|ms| {
            ms.iter()
                .find(|m| m["id"] == model)
                .map(|m| m["state"].as_str().unwrap_or("").to_owned())
        }))
    }
}

fn error_text(body: &Bytes) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned())
}

impl Fleet for HttpFleet {
    async fn topology(&self) -> Result<Vec<FleetNode>, String> {
        let url = format!("{}/v1/topology", self.discovery);
        let (status, body) = self.call(http::Method::GET, &url, None, Some(&self.token)).await?;
        if !status.is_success() {
            return Err(format!("{url}: {status}: {}", error_text(&body)));
        }
        let t: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| format!("{url}: not JSON: {e}"))?;
        let mut nodes: Vec<FleetNode> = t["nodes"]
            .as_array()
            .map(|ns| {
                ns.iter()
                    .map(|n| FleetNode {
                        id: n["id"].as_str().unwrap_or_default().to_owned(),
                        region: n["region"].as_str().unwrap_or_default().to_owned(),
                        url: n["url"].as_str().unwrap_or_default().to_owned(),
                        healthy: matches!(
                            n["health"].as_str(),
                            Some("ready" | "saturated" | "degraded")
                        ),
                        models: Default::default(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        if let Some(matrix) = t["matrix"].as_object() {
            for (model, by_node) in matrix {
                for (node, state) in by_node.as_object().into_iter().flatten() {
                    if let Some(n) = nodes.iter_mut().find(|n| &n.id == node) {
                        let state = state.as_str().unwrap_or_default().to_owned();
                        n.models.insert(model.clone(), (None, state));
                    }
                }
            }
        }
        if let Some(versions) = t["versions"].as_object() {
            for (model, by_version) in versions {
                for (version, ids) in by_version.as_object().into_iter().flatten() {
                    for id in ids.as_array().into_iter().flatten().filter_map(|i| i.as_str()) {
                        if let Some(n) = nodes.iter_mut().find(|n| n.id == id)
                            && let Some(entry) = n.models.get_mut(model)
                        {
                            entry.0 = Some(version.clone());
                        }
                    }
                }
            }
        }
        Ok(nodes)
    }

    async fn load(
        &self,
        node: &FleetNode,
        body: serde_json::Value,
        timeout: Duration,
    ) -> Result<(), String> {
        let model = body["id"].as_str().unwrap_or_default().to_owned();
        let url = self.admin_url(node, "/v1/models/load");
        let (status, answer) =
            self.call(http::Method::POST, &url, Some(body), Some(&self.token)).await?;
        if !status.is_success() {
            return Err(format!("{}: load refused ({status}): {}", node.id, error_text(&answer)));
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match self.model_state(node, &model).await {
                Ok(Some(s)) if s == "ready" => return Ok(()),
                Ok(Some(s)) if s == "failed" => {
                    return Err(format!("{}: loading {model} failed on the node", node.id));
                }
                Ok(None) => return Err(format!("{}: {model} is gone from the node", node.id)),
                _ => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!("{}: {model} not ready within {timeout:?}", node.id));
            }
            tokio::time::sleep(self.check_every).await;
        }
    }

    async fn unload(&self, node: &FleetNode, model: &str, timeout: Duration) -> Result<(), String> {
        let url = self.admin_url(node, "/v1/models/unload");
        let body = serde_json::json!({ "model": model });
        let (status, answer) =
            self.call(http::Method::POST, &url, Some(body), Some(&self.token)).await?;
        // 404: not there (any more) — what an unload wants.
        if !status.is_success() && status != http::StatusCode::NOT_FOUND {
            return Err(format!("{}: unload refused ({status}): {}", node.id, error_text(&answer)));
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Ok(None) = self.model_state(node, model).await {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!("{}: {model} still held after {timeout:?}", node.id));
            }
            tokio::time::sleep(self.check_every).await;
        }
    }

    async fn push_policy(&self, text: &str) -> Result<(), String> {
        let mut acks = match self.replicas {
            0 => None,
            _ => Some(self.bus.policy_statuses().await.map_err(|e| e.to_string())?),
        };
        let revision = self.bus.put_policy(text).await.map_err(|e| format!("policy push: {e}"))?;
        let Some(acks) = &mut acks else { return Ok(()) };
        let got = acks.collect(revision, self.replicas, self.push_timeout).await;
        if let Some(refused) = got.iter().find(|s| s.result == PolicyResult::Refused) {
            return Err(format!(
                "replica {} refused the policy: {}",
                refused.replica,
                refused.reason.as_deref().unwrap_or("no reason given")
            ));
        }
        if got.len() < self.replicas {
            return Err(format!(
                "{} of {} replicas applied the policy within {:?}",
                got.len(),
                self.replicas,
                self.push_timeout
            ));
        }
        Ok(())
    }

    async fn counters(&self, node: &FleetNode) -> Result<Counters, String> {
        let url = format!("{}/metrics", node.url.trim_end_matches('/'));
        let (status, body) = self.call(http::Method::GET, &url, None, None).await?;
        if !status.is_success() {
            return Err(format!("{url}: {status}"));
        }
        let mut c = parse_metrics(&String::from_utf8_lossy(&body));
        let url = format!("{}/health", node.url.trim_end_matches('/'));
        if let Ok((_, body)) = self.call(http::Method::GET, &url, None, None).await
            && let Ok(h) = serde_json::from_slice::<serde_json::Value>(&body)
            && h["ttft_ms"]["samples"].as_u64().is_some_and(|n| n > 0)
        {
            c.recent_ttft_p99_ms = h["ttft_ms"]["p99"].as_f64();
        }
        Ok(c)
    }

    async fn ask(
        &self,
        node: &FleetNode,
        model: &str,
        prompt: &str,
        max_tokens: u32,
    ) -> Result<String, String> {
        let url = format!("{}/v1/chat/completions", node.url.trim_end_matches('/'));
        let body = serde_json::json!({
            "model": model,
            "messages": [{ "role": "user", "content": prompt }],
            "max_tokens": max_tokens,
            "temperature": 0,
        });
        let (status, answer) =
            self.call(http::Method::POST, &url, Some(body), Some(&self.inference_token)).await?;
        if !status.is_success() {
            return Err(format!("{}: {status}: {}", node.id, error_text(&answer)));
        }
        let v: serde_json::Value =
            serde_json::from_slice(&answer).map_err(|e| format!("{}: not JSON: {e}", node.id))?;
        v["choices"][0]["message"]["content"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("{}: an answer without text", node.id))
    }
}

/// A rollout's KV key: the model's name when it is a bus token, else `x` and its hex.
pub fn state_key(model: &str) -> String {
    if !model.is_empty()
        && model.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        model.to_owned()
    } else {
        let hex: String = model.bytes().map(|b| format!("{b:02x}")).collect();
        format!("x{hex}")
    }
}

/// The key an abort request for `model`'s rollout sits under.
pub fn abort_key(model: &str) -> String {
    format!("{}_abort", state_key(model))
}

/// The rollout's state on the bus (JetStream KV, compare-and-set).
#[derive(Debug, Clone)]
pub struct BusStore {
    pub bus: Bus,
    pub model: String,
}

impl StateStore for BusStore {
    async fn load(&self) -> Result<Option<(u64, Vec<u8>)>, String> {
        self.bus.rollout_get(&state_key(&self.model)).await.map_err(|e| e.to_string())
    }

    async fn save(&self, bytes: &[u8], expected: Option<u64>) -> Result<u64, SaveError> {
        self.bus.rollout_put(&state_key(&self.model), bytes, expected).await.map_err(|e| match e {
            BusError::Conflict { .. } => SaveError::Conflict(e.to_string()),
            other => SaveError::Unavailable(other.to_string()),
        })
    }

    async fn abort_requested(&self) -> Option<(u64, String)> {
        let (rev, bytes) = self.bus.rollout_get(&abort_key(&self.model)).await.ok()??;
        Some((rev, String::from_utf8_lossy(&bytes).into_owned()))
    }
}

/// Asks the driver of `model`'s rollout to stop and roll back its current wave (it sees the
/// request at its next poll). Returns the request's revision.
pub async fn request_abort(bus: &Bus, model: &str, reason: &str) -> Result<u64, BusError> {
    let key = abort_key(model);
    // Compare-and-set from whatever is there (several requests: the last one stands).
    for _ in 0..5 {
        let current = bus.rollout_get(&key).await?.map(|(r, _)| r);
        match bus.rollout_put(&key, reason.as_bytes(), current).await {
            Err(BusError::Conflict { .. }) => continue,
            other => return other,
        }
    }
    Err(BusError::Conflict { what: "abort request", expected: None })
}
