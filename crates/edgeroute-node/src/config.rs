//! The node's configuration: one TOML file, strictly parsed, every default documented here.
//!
//! Unknown keys are errors naming the key (a typo must not silently fall back to a default).
//! A handful of environment variables override the file where operators expect to set things
//! per deployment: `EDGEROUTE_NODE_ID`, `EDGEROUTE_REGION`, `EDGEROUTE_LISTEN`,
//! `EDGEROUTE_UPSTREAM_URL`. Only the binary reads files and the environment; this module
//! turns text and an env lookup function into a validated [`NodeConfig`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use edgeroute_auth::AuthConfig;
use edgeroute_sim::SimConfig;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid node config: {0}")]
    Toml(#[from] toml::de::Error),
    #[error("invalid node config: {key}: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.to_owned(), message: message.into() }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub node: NodeSection,
    #[serde(default)]
    pub tls: Option<TlsSection>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub telemetry: Telemetry,
    /// JWT verification keys. Required unless `node.allow_unauthenticated` is set.
    #[serde(default)]
    pub auth: Option<AuthConfig>,
    #[serde(default)]
    pub backend: BackendConfig,
    #[serde(default)]
    pub models: ModelsConfig,
    /// The topology bus this node publishes its model placement and drain state on. Absent:
    /// the node publishes nothing (it still serves).
    #[serde(default)]
    pub bus: Option<edgeroute_bus::BusConfig>,
    /// Multi-model pipelines reported in `/health` (e.g. a voice pipeline STT → LLM → TTS).
    #[serde(default)]
    pub pipelines: Vec<PipelineSpec>,
    /// Where the admin plane (`/admin/*`, `/v1/models/load|unload`) is served.
    #[serde(default)]
    pub admin: AdminSection,
    /// The fleet's routing policy document (`docs/policy.md`), for its model registry: a load
    /// of a registered model is checked against the model's placement constraints.
    #[serde(default)]
    pub policy: PolicySection,
}

/// Where the node finds the fleet's policy document.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySection {
    /// The policy file (the same document discovery applies). Read at each load, so a new
    /// version needs no restart; loads are refused while it cannot be read or parsed (fail
    /// closed). Absent: loads are not checked against a registry.
    #[serde(default)]
    pub file: Option<PathBuf>,
}

/// The admin plane's listener.
///
/// - `listen` set: admin routes are served there only; the public listener answers them
///   `404`. On loopback, plaintext is accepted, and without `[auth]` the operator on this
///   machine needs no token. Any other address needs `[admin.tls]` (mTLS: a client
///   certificate chaining to `client_ca_file`) and `[auth]`. With `[auth]`, every admin call
///   needs an admin token naming this node, its region or the fleet.
/// - `listen` unset (default): admin routes share the public listener and need an admin token
///   (`[auth]`).
///
/// ```toml
/// [admin]
/// listen = "10.0.0.5:9443"
/// [admin.tls]
/// cert_file = "/etc/edgeroute/admin.pem"
/// key_file = "/etc/edgeroute/admin.key"
/// client_ca_file = "/etc/edgeroute/operators-ca.pem"
/// ``` A node without `[auth]` (`node.allow_unauthenticated`) then serves no admin
///   route at all (`403 admin_needs_auth`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSection {
    /// The admin listener's address. Default: unset.
    pub listen: Option<SocketAddr>,
    /// mTLS on the admin listener (required off loopback). Default: unset.
    pub tls: Option<AdminTls>,
}

/// The admin listener's TLS: its certificate, and the CA every client certificate must chain
/// to (a client without one is refused in the handshake).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminTls {
    /// PEM certificate chain of the admin listener.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// PEM CA certificate(s) the operators' client certificates chain to.
    pub client_ca_file: PathBuf,
}

/// Loading models at run time (`POST /v1/models/load`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelsConfig {
    /// The model repository downloads are installed into (same filesystem as its staging
    /// area). Unset: loads from a hub are refused. Default: unset.
    pub repository: Option<PathBuf>,
    /// Directories under which `path` loads are accepted (after resolving symlinks). Default:
    /// none.
    pub allowed_local_roots: Vec<PathBuf>,
    /// How long the simulator takes to load a model. Default 1000.
    pub sim_load_time_ms: u64,
    /// Longest time to resolve a model on the hub before answering the load request. Default
    /// 30000.
    pub resolve_timeout_ms: u64,
    /// Free disk space to keep after a download, on top of the model's size. Default 1024.
    pub disk_margin_mb: u64,
    /// Longest an unload drains: `POST /v1/models/unload` marks the model `draining` (routing
    /// stops sending new sessions; what is in flight and pinned sessions are still served,
    /// with a migrate hint), and the backend unload starts when the model's last request in
    /// flight ends or after this long, whichever is first. `0` unloads at once. Default 30000.
    pub unload_drain_ms: u64,
    /// The Hugging Face hub to download from. `HF_ENDPOINT` and `HF_TOKEN` override
    /// `endpoint` and `token`. Only the endpoint's host is contacted unless more hosts (the
    /// hub's CDN) are listed in `allowed_hosts`.
    pub hub: edgeroute_hub::HubConfig,
    /// An Ed25519 private key (PKCS#8 PEM) that seals every model installed into
    /// `repository` (`.edgeroute-seal`: a signed list of its files and their SHA-256), so
    /// that `edgeroute watch --seal-public-key` on the backend's side installs only what this
    /// node wrote. Needs `seal_kid` and `repository`. Default: unset (installs unsealed).
    pub seal_key_file: Option<PathBuf>,
    /// The key id recorded in seals, as given to `edgeroute watch --seal-public-key KID=FILE`.
    pub seal_kid: Option<String>,
    /// Who talks to the hub for `POST /v1/models/load` of a hub model: this node (`"node"`,
    /// the default: it downloads into `repository`, converting for Triton when `triton_url`
    /// is set), or the `edgeroute watch` sidecar on the GPU side (`"sidecar"`): the node then
    /// holds no Hugging Face token and never contacts the hub; it writes a load order signed
    /// with `seal_key_file` to `repository` (the shared volume) and follows the sidecar's
    /// answer (see [`crate::orders`]). `"sidecar"` needs `repository` and `seal_key_file`.
    pub downloads: Downloads,
}

/// Who downloads hub models: see [`ModelsConfig::downloads`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Downloads {
    #[default]
    Node,
    Sidecar,
}

impl ModelsConfig {
    /// The seal settings come together, and only with a repository to seal; orders for the
    /// sidecar need both.
    fn validate(&self) -> Result<(), ConfigError> {
        if self.downloads == Downloads::Sidecar
            && (self.repository.is_none() || self.seal_key_file.is_none())
        {
            return Err(invalid(
                "models.downloads",
                "\"sidecar\" needs models.repository (the shared volume) and models.seal_key_file \
                 (orders are signed)",
            ));
        }
        match (&self.seal_key_file, &self.seal_kid) {
            (None, None) => Ok(()),
            (Some(_), None) => {
                Err(invalid("models.seal_kid", "required with models.seal_key_file"))
            }
            (None, Some(_)) => {
                Err(invalid("models.seal_key_file", "required with models.seal_kid"))
            }
            (Some(_), Some(kid)) => {
                if self.repository.is_none() {
                    return Err(invalid("models.seal_key_file", "needs models.repository"));
                }
                if kid.is_empty() || kid.len() > 128 || !kid.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(invalid(
                        "models.seal_kid",
                        "1 to 128 printable ASCII characters without spaces",
                    ));
                }
                Ok(())
            }
        }
    }
}

impl Default for ModelsConfig {
    fn default() -> Self {
        ModelsConfig {
            repository: None,
            allowed_local_roots: vec![],
            sim_load_time_ms: 1000,
            resolve_timeout_ms: 30_000,
            disk_margin_mb: 1024,
            unload_drain_ms: 30_000,
            hub: edgeroute_hub::HubConfig::default(),
            seal_key_file: None,
            seal_kid: None,
            downloads: Downloads::Node,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSpec {
    pub id: String,
    /// The models the pipeline calls, in order.
    pub models: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    /// Stable node id, reported in every response (`x-edgeroute-node`). Required.
    pub id: String,
    /// Region the node runs in (`vancouver`). Required.
    pub region: String,
    /// Address to listen on. Default `127.0.0.1:8080`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Runtime threads: `0` = one per CPU core; `1` = a single-threaded event loop (like one
    /// nginx worker: no cross-thread wake-ups, lowest latency when the node shares few cores
    /// with its backend). Default `0`.
    #[serde(default)]
    pub worker_threads: usize,
    /// The URL clients reach this node at, as published on the topology bus. Default:
    /// `http://<listen>` (`https://` with `[tls]`).
    #[serde(default)]
    pub public_url: Option<String>,
    /// Serve without authentication (every caller is tenant `anonymous`). Only for loopback
    /// development; the node logs a warning at start. Never opens the admin routes on the
    /// public listener (see [`AdminSection`]). Default `false`.
    #[serde(default)]
    pub allow_unauthenticated: bool,
    /// Accept a non-loopback `listen` address in plaintext (no `[tls]`) or without `[auth]`:
    /// the second, explicit flag a private network behind its own TLS terminator needs.
    /// Without it such a config is refused at start-up. Default `false`.
    #[serde(default)]
    pub insecure_public: bool,
    /// Price per 1,000 tokens on this node, reported in `/health` for discovery's
    /// cost-optimized strategy. Default: unset.
    #[serde(default)]
    pub cost_per_1k: Option<f64>,
    /// The jurisdiction the node processes data in (`eu`, `ca`...), for data residency: a
    /// token whose `jurisdictions` claim does not name it is refused here (403
    /// `residency_violation`), whatever route the client took. A node without one refuses
    /// every token that carries the claim (fail closed). Default: unset.
    #[serde(default)]
    pub jurisdiction: Option<String>,
    /// The node's hardware class (`gpu`, `npu`, `cpu`), for the model registry's placement
    /// constraints. Default `gpu`.
    #[serde(default = "default_hardware")]
    pub hardware: edgeroute_policy::Hardware,
}

fn default_hardware() -> edgeroute_policy::Hardware {
    edgeroute_policy::Hardware::Gpu
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

/// TLS termination. Absent: plain HTTP (for loopback development).
pub use edgeroute_http::tls::TlsSection;

/// Every limit, explicit. Durations are in milliseconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest request body; larger gets 413. Default 4 MiB.
    pub max_body_bytes: usize,
    /// Largest audio upload (`/v1/audio/transcriptions`, `/translations`: the whole form);
    /// larger gets 413. Default 25 MiB, OpenAI's.
    pub max_audio_bytes: usize,
    /// Longest audio upload, seconds, where the gateway can tell without decoding (a WAV's
    /// header); longer gets 400 `audio_too_long` before the backend sees it. Other formats
    /// are bounded by `max_audio_bytes` and the backend's own limit. Default 1800.
    pub max_audio_seconds: u32,
    /// Time to receive a whole request body, from the end of its head (nginx's
    /// `client_body_timeout`, but total: a body trickled in a byte at a time is cut). Later
    /// gets 408. Default 15000 (4 MiB then needs about 2.2 Mbit/s).
    pub body_read_timeout_ms: u64,
    /// Request bodies being received or waiting for the backend, all tenants together, bytes.
    /// A request reserves its `Content-Length` (or `max_body_bytes` when chunked) before its
    /// body is read; beyond the budget, or beyond its tenant's `tenant_max_share` of it, it is
    /// shed with 503 and a `Retry-After`. Default 64 MiB.
    pub max_buffered_body_bytes: usize,
    /// Share of `max_concurrency` (and of `max_buffered_body_bytes`) one tenant may hold;
    /// beyond it 429 (503 for body room) with a `Retry-After`, and other tenants keep theirs.
    /// Default 0.5.
    pub tenant_max_share: f64,
    /// Largest `n` (choices per request). Default 8.
    pub max_n: u32,
    /// Largest `max_tokens` / `max_completion_tokens`. Default 32768.
    pub max_output_tokens: u32,
    /// Most messages in one request. Default 2048.
    pub max_messages: usize,
    /// Largest prompt: the bytes of every message's text together. Default 4 MiB.
    pub max_prompt_bytes: usize,
    /// Largest request head; larger gets 431. Default 16 KiB (at least 8 KiB).
    pub max_header_bytes: usize,
    /// Most headers in one request. Default 100.
    pub max_headers: usize,
    /// Serve plain HTTP/1.1 requests (HTTP/1.1, a body that fits `max_header_bytes` with its
    /// head, no `transfer-encoding`, `expect` or `upgrade`) on the node's own inline path;
    /// hyper serves a connection from its first request that path does not take, and every
    /// HTTP/2 connection. `false`: hyper serves everything. Default true.
    pub http1_inline: bool,
    /// Time to receive a whole request head (slowloris defence), from accept and from the first
    /// byte of each later request; it never runs between requests (idle keep-alive
    /// connections live for `idle_timeout_ms`). Default 5000.
    pub header_read_timeout_ms: u64,
    /// Keep-alive connections idle this long are closed. Default 60000.
    pub idle_timeout_ms: u64,
    /// Open connections; beyond it accepting pauses. Default 4096.
    pub max_connections: usize,
    /// Open connections from one source address; more are closed at accept. `0`: no cap.
    /// Default 512.
    pub max_connections_per_source: usize,
    /// Concurrent streams per HTTP/2 connection. Default 100 (Envoy's edge value).
    pub http2_max_concurrent_streams: u32,
    /// HTTP/2 flow-control window per stream, bytes. Default 65536 (Envoy's edge value).
    pub http2_stream_window_bytes: u32,
    /// HTTP/2 flow-control window per connection, bytes. Default 1 MiB (Envoy's edge value).
    pub http2_connection_window_bytes: u32,
    /// Requests in flight on this node; beyond it requests are shed with 503, a
    /// `Retry-After` and a migrate hint, never queued without bound. Default 256.
    pub max_concurrency: u32,
    /// Sustained requests per second per tenant (JWT `sub`), GCRA. Default 50.
    pub rate_limit_per_s: u32,
    /// Burst per tenant. Default 100.
    pub rate_limit_burst: u32,
    /// A backend stream that produces nothing for this long is ended with an SSE error.
    /// Default 30000.
    pub stream_idle_timeout_ms: u64,
    /// After shutdown starts, in-flight requests get this long to finish. Default 30000.
    pub shutdown_grace_ms: u64,
    /// Health reports not-ready this long before the node stops accepting, so discovery and
    /// clients move away first. Default 0.
    pub not_ready_delay_ms: u64,
    /// Default deadline of `POST /admin/drain`. Default 30000.
    pub drain_deadline_ms: u64,
    /// Sessions remembered (for serving known sessions while draining). Default 100000.
    pub max_sessions: usize,
    /// A session unseen for this long is forgotten. Default 600000.
    pub session_ttl_ms: u64,
    /// Realtime sessions (`GET /v1/realtime`, WebSockets) open on this node; beyond it a new
    /// one is refused with 503 and a `Retry-After`. One tenant may hold `tenant_max_share` of
    /// them (429 beyond). Default 256.
    pub max_realtime_sessions: u32,
    /// Largest realtime event (one WebSocket message, an audio append included); larger
    /// closes the session with 1009. Default 4 MiB (about 60 s of 24 kHz PCM16 in base64).
    pub max_realtime_event_bytes: usize,
    /// A realtime session with no event either way for this long is closed. Default 300000.
    pub realtime_idle_timeout_ms: u64,
    /// A realtime session's longest life (OpenAI's is an hour); then it is closed with 1008
    /// and the client opens another. Default 3600.
    pub realtime_max_session_s: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 4 * 1024 * 1024,
            max_audio_bytes: 25 * 1024 * 1024,
            max_audio_seconds: 1800,
            body_read_timeout_ms: 15_000,
            max_buffered_body_bytes: 64 * 1024 * 1024,
            tenant_max_share: 0.5,
            max_n: 8,
            max_output_tokens: 32_768,
            max_messages: 2048,
            max_prompt_bytes: 4 * 1024 * 1024,
            max_header_bytes: 16 * 1024,
            max_headers: 100,
            http1_inline: true,
            header_read_timeout_ms: 5_000,
            idle_timeout_ms: 60_000,
            max_connections: 4096,
            max_connections_per_source: 512,
            http2_max_concurrent_streams: 100,
            http2_stream_window_bytes: 65_536,
            http2_connection_window_bytes: 1024 * 1024,
            max_concurrency: 256,
            rate_limit_per_s: 50,
            rate_limit_burst: 100,
            stream_idle_timeout_ms: 30_000,
            shutdown_grace_ms: 30_000,
            not_ready_delay_ms: 0,
            drain_deadline_ms: 30_000,
            max_sessions: 100_000,
            session_ttl_ms: 600_000,
            max_realtime_sessions: 256,
            max_realtime_event_bytes: 4 * 1024 * 1024,
            realtime_idle_timeout_ms: 300_000,
            realtime_max_session_s: 3600,
        }
    }
}

impl Limits {
    /// In-flight requests one tenant may hold: `tenant_max_share` of `max_concurrency`, at
    /// least one.
    pub fn tenant_concurrency(&self) -> u32 {
        let share = (f64::from(self.max_concurrency) * self.tenant_max_share).ceil();
        (share as u32).clamp(1, self.max_concurrency.max(1))
    }

    /// Realtime sessions one tenant may hold: `tenant_max_share` of `max_realtime_sessions`,
    /// at least one.
    pub fn tenant_realtime_sessions(&self) -> u32 {
        let share = (f64::from(self.max_realtime_sessions) * self.tenant_max_share).ceil();
        (share as u32).clamp(1, self.max_realtime_sessions.max(1))
    }

    pub fn server_limits(&self) -> edgeroute_http::ServerLimits {
        edgeroute_http::ServerLimits {
            header_read_timeout: ms(self.header_read_timeout_ms),
            idle_timeout: ms(self.idle_timeout_ms),
            tls_handshake_timeout: ms(self.header_read_timeout_ms),
            max_connections: self.max_connections,
            max_connections_per_source: self.max_connections_per_source,
            http2_stream_window_bytes: self.http2_stream_window_bytes,
            http2_connection_window_bytes: self.http2_connection_window_bytes,
            max_header_bytes: self.max_header_bytes,
            max_headers: self.max_headers,
            http1_inline: self.http1_inline,
            http2_max_concurrent_streams: self.http2_max_concurrent_streams,
            shutdown_grace: ms(self.shutdown_grace_ms),
            counters: Default::default(),
        }
    }
}

pub(crate) fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Telemetry {
    /// Sliding window for latency percentiles and error rate, seconds. Default 10.
    pub window_s: u32,
    /// Error rate above which the node reports itself `degraded`. Default 0.2.
    pub degraded_error_rate: f64,
    /// Requests the window must hold before the error rate can mark the node degraded.
    /// Default 20.
    pub degraded_min_samples: u64,
}

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry { window_s: 10, degraded_error_rate: 0.2, degraded_min_samples: 20 }
    }
}

/// The inference backend behind the gateway. Default: the simulator with its defaults.
// A config value, built once at start: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum BackendConfig {
    /// The built-in simulator, in process. Its settings go under `[backend.sim]`.
    Sim {
        #[serde(default)]
        sim: SimConfig,
    },
    /// Any OpenAI-compatible server: vLLM, SGLang, llama.cpp, TGI, Ollama, Triton's OpenAI
    /// frontend.
    Openai(OpenAiConfig),
}

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig::Sim { sim: SimConfig::default() }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenAiConfig {
    /// Base URL of the upstream (`http://127.0.0.1:8000`); `/v1/chat/completions` is appended.
    pub url: String,
    /// Environment variable holding the upstream's API key, sent as a bearer token.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Its value, as the config loader's environment lookup found it (never from the file).
    #[serde(skip)]
    pub api_key: edgeroute_auth::Secret,
    /// Default 1000.
    #[serde(default = "d_connect")]
    pub connect_timeout_ms: u64,
    /// Streaming: time from sending the request to the first streamed event. Default 30000.
    #[serde(default = "d_first_byte")]
    pub first_byte_timeout_ms: u64,
    /// Non-streaming: time for the whole answer. Default 300000.
    #[serde(default = "d_request")]
    pub request_timeout_ms: u64,
    /// Idle pooled connections kept per upstream. Default 256.
    #[serde(default = "d_pool")]
    pub pool_max_idle: usize,
    /// Largest non-streaming answer accepted from the upstream. Default 16 MiB.
    #[serde(default = "d_max_response")]
    pub max_response_bytes: usize,
    /// Models the upstream serves at start (more can be loaded at run time). May be empty
    /// when models are loaded through `POST /v1/models/load`.
    #[serde(default)]
    pub models: Vec<UpstreamModel>,
    /// Triton's HTTP endpoint for its model repository API (`POST /v2/repository/...`), when
    /// the upstream is Triton. Loads then go through Triton; otherwise a load waits for the
    /// model to appear in the upstream's `GET /v1/models`.
    #[serde(default)]
    pub triton_url: Option<String>,
    /// The header Triton's restricted repository API requires
    /// (`--http-restricted-api=model-repository:<name>=<value>`), sent on every load and
    /// unload; with `triton_restricted_key_env`. Default: none.
    #[serde(default)]
    pub triton_restricted_header: Option<String>,
    /// Environment variable holding that header's value. Default: none.
    #[serde(default)]
    pub triton_restricted_key_env: Option<String>,
    /// Its value, as the config loader's environment lookup found it (never from the file).
    #[serde(skip)]
    pub triton_restricted_key: edgeroute_auth::Secret,
    /// Triton's model repository as Triton itself (and `edgeroute watch --repository`) sees
    /// it, when that differs from `models.repository`: a hub model converted for Triton's
    /// vLLM backend names its weights by an absolute path under it (`1/model.json`), and the
    /// watcher refuses an entry whose paths point anywhere else. Needs `triton_url`. Default:
    /// `models.repository` (Triton reads the node's repository directly).
    #[serde(default)]
    pub triton_repository: Option<PathBuf>,
    /// Longest a backend load may take. Default 600000.
    #[serde(default = "d_load_timeout")]
    pub load_timeout_ms: u64,
    /// GPUs behind the upstream, for capacity reporting. Default: one `gpu0` with
    /// `max_concurrency` slots.
    #[serde(default)]
    pub gpus: Vec<GpuSpec>,
    /// Request fields forwarded to this upstream beyond OpenAI's chat API (e.g. vLLM's
    /// `top_k`, `min_p`, `repetition_penalty`). Others are dropped (and counted in
    /// `edgeroute_request_fields_dropped_total`). Default: none.
    #[serde(default)]
    pub extra_fields: Vec<String>,
    /// For an `https://` upstream: the CA its certificate must chain to and the client
    /// certificate the node presents (mutual TLS), so the GPU side serves the gateway only.
    /// Default: the compiled-in roots, no client certificate.
    #[serde(default)]
    pub tls: Option<edgeroute_http::upstream::UpstreamTls>,
}

impl OpenAiConfig {
    /// An upstream at `url` with every other setting at its default and no models yet.
    pub fn new(url: impl Into<String>) -> OpenAiConfig {
        OpenAiConfig {
            url: url.into(),
            api_key_env: None,
            api_key: edgeroute_auth::Secret::default(),
            connect_timeout_ms: d_connect(),
            first_byte_timeout_ms: d_first_byte(),
            request_timeout_ms: d_request(),
            pool_max_idle: d_pool(),
            max_response_bytes: d_max_response(),
            models: vec![],
            triton_url: None,
            triton_restricted_header: None,
            triton_restricted_key_env: None,
            triton_restricted_key: edgeroute_auth::Secret::default(),
            triton_repository: None,
            load_timeout_ms: d_load_timeout(),
            gpus: vec![],
            extra_fields: vec![],
            tls: None,
        }
    }
}

fn d_connect() -> u64 {
    1_000
}
fn d_first_byte() -> u64 {
    30_000
}
fn d_request() -> u64 {
    300_000
}
fn d_pool() -> usize {
    256
}
fn d_load_timeout() -> u64 {
    600_000
}
fn d_max_response() -> usize {
    16 * 1024 * 1024
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamModel {
    /// The id clients ask for.
    pub id: String,
    /// The id the upstream knows it by. Default: same as `id`.
    #[serde(default)]
    pub upstream_name: Option<String>,
    /// GPU the model runs on. Default: the first GPU.
    #[serde(default)]
    pub gpu: Option<String>,
    /// VRAM the model occupies, for reporting. Default 0.
    #[serde(default)]
    pub memory_mb: u64,
    /// How a partial answer is continued (a request whose final message is the assistant's,
    /// with `continue_final_message: true`, as the client SDK sends after a cut stream).
    /// `native` (default): forwarded as is, for upstreams that take it (vLLM, SGLang).
    /// `template`: the node renders `chat_template` itself and continues through the
    /// upstream's `/v1/completions` (llama.cpp, whose chat endpoint would start a new turn).
    #[serde(default)]
    pub continuation: Continuation,
    /// The chat template for `continuation = "template"`: a `.gguf` model file (its
    /// `tokenizer.chat_template`), a Hugging Face `tokenizer_config.json`, or a Jinja file.
    #[serde(default)]
    pub chat_template: Option<std::path::PathBuf>,
}

impl UpstreamModel {
    /// A model the upstream knows by the same id, continued natively.
    pub fn new(id: impl Into<String>) -> UpstreamModel {
        UpstreamModel {
            id: id.into(),
            upstream_name: None,
            gpu: None,
            memory_mb: 0,
            continuation: Continuation::Native,
            chat_template: None,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Continuation {
    #[default]
    Native,
    Template,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuSpec {
    /// The GPU's id in placements and loads (`gpu` of `POST /v1/models/load`). The list's
    /// order is the CUDA device order: a model converted for Triton on the n-th GPU (from 0)
    /// gets an instance group pinned to device n.
    pub id: String,
    /// Concurrent requests the GPU serves at once (batch lanes).
    pub slots: u32,
    #[serde(default)]
    pub memory_total_mb: u64,
}

impl NodeConfig {
    /// A node named `id` in `region` with every other setting at its default, listening on
    /// `127.0.0.1:0`, and no `[auth]` (set `auth` or `node.allow_unauthenticated` before
    /// building): the typed counterpart of a config file, for fleets built in code.
    pub fn new(id: impl Into<String>, region: impl Into<String>) -> NodeConfig {
        NodeConfig {
            node: NodeSection {
                id: id.into(),
                region: region.into(),
                listen: SocketAddr::from(([127, 0, 0, 1], 0)),
                worker_threads: 0,
                public_url: None,
                allow_unauthenticated: false,
                insecure_public: false,
                cost_per_1k: None,
                jurisdiction: None,
                hardware: default_hardware(),
            },
            tls: None,
            limits: Limits::default(),
            telemetry: Telemetry::default(),
            auth: None,
            backend: BackendConfig::default(),
            models: ModelsConfig::default(),
            bus: None,
            pipelines: vec![],
            admin: AdminSection::default(),
            policy: PolicySection::default(),
        }
    }

    /// Parses a config file's text and applies environment overrides through `env`.
    pub fn parse(
        text: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<NodeConfig, ConfigError> {
        let mut cfg: NodeConfig = toml::from_str(text)?;
        cfg.apply_env(env)?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(a) = &mut self.auth {
            a.resolve_env(&env);
        }
        if let BackendConfig::Openai(o) = &mut self.backend {
            o.api_key = edgeroute_auth::Secret::new(o.api_key_env.as_deref().and_then(&env));
            o.triton_restricted_key =
                edgeroute_auth::Secret::new(o.triton_restricted_key_env.as_deref().and_then(&env));
        }
        if let Some(v) = env("EDGEROUTE_NODE_ID") {
            self.node.id = v;
        }
        if let Some(v) = env("EDGEROUTE_REGION") {
            self.node.region = v;
        }
        if let Some(v) = env("EDGEROUTE_JURISDICTION") {
            self.node.jurisdiction = Some(v);
        }
        if let Some(v) = env("EDGEROUTE_LISTEN") {
            self.node.listen =
                v.parse().map_err(|e| invalid("EDGEROUTE_LISTEN", format!("`{v}`: {e}")))?;
        }
        if let Some(v) = env("HF_ENDPOINT") {
            self.models.hub.endpoint = v;
        }
        if let Some(v) = env("HF_TOKEN") {
            self.models.hub.token = Some(v);
        }
        if let Some(v) = env("EDGEROUTE_UPSTREAM_URL") {
            match &mut self.backend {
                BackendConfig::Openai(o) => o.url = v,
                BackendConfig::Sim { .. } => {
                    return Err(invalid(
                        "EDGEROUTE_UPSTREAM_URL",
                        "set, but backend.kind is `sim`",
                    ));
                }
            }
        }
        Ok(())
    }

    /// Whether admin routes are served on a listener of their own (`admin.listen`).
    pub fn admin_listener(&self) -> bool {
        self.admin.listen.is_some()
    }

    /// A public listener off loopback needs TLS and auth unless `node.insecure_public` says
    /// otherwise; an admin listener must be on loopback and apart from the public one.
    fn validate_exposure(&self) -> Result<(), ConfigError> {
        let listen = self.node.listen;
        if !listen.ip().is_loopback() && !self.node.insecure_public {
            let mut missing = Vec::new();
            if self.tls.is_none() {
                missing.push("[tls] (it would serve plaintext)");
            }
            if self.auth.is_none() {
                missing.push("[auth] (it would serve without authentication)");
            }
            if !missing.is_empty() {
                return Err(invalid(
                    "node.listen",
                    format!(
                        "{listen} is not a loopback address and the node has no {}: configure them, \
                         listen on 127.0.0.1, or set node.insecure_public = true if a trusted \
                         network or a TLS terminator in front makes this safe",
                        missing.join(" and no ")
                    ),
                ));
            }
        }
        if self.admin.tls.is_some() && self.admin.listen.is_none() {
            return Err(invalid("admin.tls", "set admin.listen: [admin.tls] is for its listener"));
        }
        if let Some(admin) = self.admin.listen {
            if !admin.ip().is_loopback() && (self.admin.tls.is_none() || self.auth.is_none()) {
                return Err(invalid(
                    "admin.listen",
                    format!(
                        "{admin} is not a loopback address: an admin listener off loopback needs \
                         [admin.tls] (mTLS: cert_file, key_file, client_ca_file) and [auth] \
                         (admin tokens); or listen on 127.0.0.1 and reach it through an SSH tunnel"
                    ),
                ));
            }
            if admin.port() != 0 && admin == listen {
                return Err(invalid(
                    "admin.listen",
                    format!("{admin} is also node.listen: give the admin plane its own address"),
                ));
            }
        }
        Ok(())
    }

    /// A warning when the backend is reached in plaintext at an address that is not loopback
    /// or a private network (RFC 1918, RFC 4193, link-local, CGNAT): the GPU side should sit on
    /// a network only the gateway reaches (the deployment's NetworkPolicy), or be reached over
    /// `https://` with `[backend.tls]`. A host name is not judged (it is resolved later).
    pub fn backend_exposure_warning(&self) -> Option<String> {
        let BackendConfig::Openai(o) = &self.backend else { return None };
        let uri: http::Uri = o.url.parse().ok()?;
        if uri.scheme_str() == Some("https") {
            return None;
        }
        let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
        let ip: std::net::IpAddr = host.parse().ok()?;
        if is_private_or_local(ip) {
            return None;
        }
        Some(format!(
            "backend.url {} is plaintext to {ip}, which is neither loopback nor a private \
             network: put the backend where only the gateway reaches it, or use https:// with \
             [backend.tls]",
            o.url
        ))
    }

    /// Checks what serde cannot: ids, ranges and references between sections.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node.cost_per_1k.is_some_and(|c| !c.is_finite() || c < 0.0) {
            return Err(invalid("node.cost_per_1k", "a finite number ≥ 0"));
        }
        use edgeroute_proto::names::{NAME_RULE, is_name};
        if !is_name(&self.node.id) {
            return Err(invalid("node.id", NAME_RULE));
        }
        if !is_name(&self.node.region) {
            return Err(invalid("node.region", NAME_RULE));
        }
        match (&self.auth, self.node.allow_unauthenticated) {
            (None, false) => {
                return Err(invalid(
                    "auth",
                    "no [auth] section: configure JWT keys, or set node.allow_unauthenticated = true for local development",
                ));
            }
            (Some(a), _) => a.validate().map_err(|e| invalid("auth", e.to_string()))?,
            (None, true) => {}
        }
        self.validate_exposure()?;
        self.models.validate()?;
        let l = &self.limits;
        for (key, v) in [
            ("limits.max_concurrency", u64::from(l.max_concurrency)),
            ("limits.rate_limit_per_s", u64::from(l.rate_limit_per_s)),
            ("limits.rate_limit_burst", u64::from(l.rate_limit_burst)),
            ("limits.max_connections", l.max_connections as u64),
            ("limits.header_read_timeout_ms", l.header_read_timeout_ms),
            ("limits.idle_timeout_ms", l.idle_timeout_ms),
            ("limits.stream_idle_timeout_ms", l.stream_idle_timeout_ms),
            ("limits.max_body_bytes", l.max_body_bytes as u64),
            ("limits.max_audio_bytes", l.max_audio_bytes as u64),
            ("limits.max_audio_seconds", u64::from(l.max_audio_seconds)),
            ("limits.body_read_timeout_ms", l.body_read_timeout_ms),
            ("limits.max_buffered_body_bytes", l.max_buffered_body_bytes as u64),
            ("limits.max_n", u64::from(l.max_n)),
            ("limits.max_output_tokens", u64::from(l.max_output_tokens)),
            ("limits.max_messages", l.max_messages as u64),
            ("limits.max_prompt_bytes", l.max_prompt_bytes as u64),
            ("limits.http2_max_concurrent_streams", u64::from(l.http2_max_concurrent_streams)),
            ("limits.max_realtime_sessions", u64::from(l.max_realtime_sessions)),
            ("limits.max_realtime_event_bytes", l.max_realtime_event_bytes as u64),
            ("limits.realtime_idle_timeout_ms", l.realtime_idle_timeout_ms),
            ("limits.realtime_max_session_s", l.realtime_max_session_s),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be greater than 0"));
            }
        }
        if l.max_header_bytes < 8192 {
            return Err(invalid("limits.max_header_bytes", "must be at least 8192"));
        }
        if !(l.tenant_max_share > 0.0 && l.tenant_max_share <= 1.0) {
            return Err(invalid("limits.tenant_max_share", "a share in (0, 1]"));
        }
        if (l.max_buffered_body_bytes as f64 * l.tenant_max_share) < l.max_body_bytes as f64 {
            return Err(invalid(
                "limits.max_buffered_body_bytes",
                "times limits.tenant_max_share must be at least limits.max_body_bytes (one tenant's largest body must fit)",
            ));
        }
        // HTTP/2 windows: RFC 9113 bounds (65,535 is the protocol's initial value; 2^31 - 1
        // its largest).
        for (key, v) in [
            ("limits.http2_stream_window_bytes", l.http2_stream_window_bytes),
            ("limits.http2_connection_window_bytes", l.http2_connection_window_bytes),
        ] {
            if !(65_535..=(1 << 31) - 1).contains(&v) {
                return Err(invalid(key, "between 65535 and 2147483647"));
            }
        }
        for (i, p) in self.pipelines.iter().enumerate() {
            if p.id.is_empty()
                || p.models.is_empty()
                || self.pipelines[..i].iter().any(|q| q.id == p.id)
            {
                return Err(invalid(
                    "pipelines",
                    format!("pipeline `{}` needs a unique id and at least one model", p.id),
                ));
            }
        }
        if self.telemetry.window_s == 0 {
            return Err(invalid("telemetry.window_s", "must be greater than 0"));
        }
        match &self.backend {
            BackendConfig::Sim { sim } => {
                sim.validate().map_err(|e| invalid("backend.sim", e.to_string()))?
            }
            BackendConfig::Openai(o) => {
                let ok = o.url.starts_with("http://") || o.url.starts_with("https://");
                if !ok || o.url.parse::<http::Uri>().is_err() {
                    return Err(invalid(
                        "backend.url",
                        format!("`{}` is not an http(s) URL", o.url),
                    ));
                }
                if o.triton_restricted_header.is_some() != o.triton_restricted_key_env.is_some() {
                    return Err(invalid(
                        "backend.triton_restricted_header",
                        "triton_restricted_header and triton_restricted_key_env go together",
                    ));
                }
                if let Some(repo) = &o.triton_repository {
                    if o.triton_url.is_none() {
                        return Err(invalid("backend.triton_repository", "needs triton_url"));
                    }
                    if !repo.is_absolute() || repo.to_str().is_none() {
                        return Err(invalid(
                            "backend.triton_repository",
                            format!("`{}` must be an absolute UTF-8 path", repo.display()),
                        ));
                    }
                }
                if o.tls.is_some() && !o.url.starts_with("https://") {
                    return Err(invalid(
                        "backend.tls",
                        format!("TLS settings need an https:// url, not `{}`", o.url),
                    ));
                }
                for (i, m) in o.models.iter().enumerate() {
                    if m.id.is_empty() || o.models[..i].iter().any(|p| p.id == m.id) {
                        return Err(invalid(
                            "backend.models",
                            format!("model id `{}` is empty or repeated", m.id),
                        ));
                    }
                    if let Some(g) = &m.gpu
                        && !o.gpus.iter().any(|s| &s.id == g)
                    {
                        return Err(invalid(
                            "backend.models",
                            format!("model `{}` names unknown GPU `{g}`", m.id),
                        ));
                    }
                    if (m.continuation == Continuation::Template) != m.chat_template.is_some() {
                        return Err(invalid(
                            "backend.models",
                            format!(
                                "model `{}`: `continuation = \"template\"` and `chat_template` go together",
                                m.id
                            ),
                        ));
                    }
                }
                if o.gpus.iter().any(|g| g.slots == 0) {
                    return Err(invalid("backend.gpus", "every GPU needs at least one slot"));
                }
            }
        }
        Ok(())
    }
}

/// Loopback, RFC 1918, CGNAT (100.64/10), link-local, and IPv6 unique-local (fc00::/7).
pub fn is_private_or_local(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(a) => {
            let o = a.octets();
            a.is_loopback()
                || a.is_private()
                || a.is_link_local()
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
        }
        std::net::IpAddr::V6(a) => {
            let s = a.segments();
            a.is_loopback()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || a.to_ipv4_mapped().is_some_and(|v4| is_private_or_local(v4.into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str =
        "[node]\nid = \"van-1\"\nregion = \"vancouver\"\nallow_unauthenticated = true\n";

    fn parse(s: &str) -> Result<NodeConfig, ConfigError> {
        NodeConfig::parse(s, |_| None)
    }

    #[test]
    fn minimal_config_takes_documented_defaults() {
        let c = parse(MIN).unwrap();
        assert_eq!(c.node.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.limits.max_concurrency, 256);
        assert_eq!(c.limits.max_body_bytes, 4 * 1024 * 1024);
        assert!(matches!(c.backend, BackendConfig::Sim { .. }));
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_key() {
        let e = parse(&format!("{MIN}[limits]\nmax_concurency = 3\n")).unwrap_err().to_string();
        assert!(e.contains("max_concurency"), "{e}");
        let e = parse(&format!("{MIN}[backend]\nkind = \"sim\"\n[backend.sim]\nttft_bse_ms = 1\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("ttft_bse_ms"), "{e}");
        let e = parse(&format!("{MIN}colour = 1\n")).unwrap_err().to_string();
        assert!(e.contains("colour"), "{e}");
        let e = parse(&format!(
            "{MIN}[backend]\nkind = \"openai\"\nurl = \"http://x\"\nmodels = []\nbogus = 1\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("bogus"), "{e}");
    }

    #[test]
    fn auth_is_required_unless_explicitly_waived() {
        let e = parse("[node]\nid = \"a\"\nregion = \"r\"\n").unwrap_err().to_string();
        assert!(e.contains("allow_unauthenticated"), "{e}");
    }

    #[test]
    fn env_overrides_apply_and_are_checked() {
        let env = |k: &str| match k {
            "EDGEROUTE_NODE_ID" => Some("tor-2".to_owned()),
            "EDGEROUTE_LISTEN" => Some("127.0.0.1:9999".to_owned()),
            _ => None,
        };
        let c = NodeConfig::parse(MIN, env).unwrap();
        assert_eq!(c.node.id, "tor-2");
        assert_eq!(c.node.listen.port(), 9999);
        let e = NodeConfig::parse(MIN, |k| (k == "EDGEROUTE_LISTEN").then(|| "nope".into()))
            .unwrap_err();
        assert!(e.to_string().contains("EDGEROUTE_LISTEN"));
        let e =
            NodeConfig::parse(MIN, |k| (k == "EDGEROUTE_UPSTREAM_URL").then(|| "http://x".into()))
                .unwrap_err();
        assert!(e.to_string().contains("sim"));
    }

    #[test]
    fn openai_backend_is_validated() {
        let ok = format!(
            "{MIN}[backend]\nkind = \"openai\"\nurl = \"http://127.0.0.1:8000\"\n[[backend.models]]\nid = \"m\"\n"
        );
        assert!(parse(&ok).is_ok());
        let bad_url = ok.replace("http://127.0.0.1:8000", "ftp://x");
        assert!(parse(&bad_url).unwrap_err().to_string().contains("backend.url"));
        let bad_gpu = format!("{ok}gpu = \"gpu9\"\n");
        assert!(parse(&bad_gpu).unwrap_err().to_string().contains("gpu9"));
        let bad_id = MIN.replace("van-1", "van 1/..");
        assert!(parse(&bad_id).unwrap_err().to_string().contains("node.id"));
        let zero = format!("{MIN}[limits]\nmax_concurrency = 0\n");
        assert!(parse(&zero).unwrap_err().to_string().contains("max_concurrency"));
    }

    #[test]
    fn a_plaintext_backend_off_the_private_networks_is_warned_about() {
        let cfg = |url: &str| {
            parse(&format!(
                "{MIN}[backend]\nkind = \"openai\"\nurl = \"{url}\"\n[[backend.models]]\nid = \"m\"\n"
            ))
            .unwrap()
        };
        for quiet in [
            "http://127.0.0.1:8000",
            "http://10.200.1.2:8000",
            "http://192.168.3.4:8000",
            "http://172.20.0.9:8000",
            "http://100.64.1.1:8000",
            "http://[fd00::5]:8000",
            "http://[::1]:8000",
            "http://triton.gpu.svc:8000",
            "https://203.0.113.9:8000",
        ] {
            assert_eq!(cfg(quiet).backend_exposure_warning(), None, "{quiet}");
        }
        for loud in ["http://203.0.113.9:8000", "http://[2001:db8::1]:8000", "http://172.32.0.1:80"]
        {
            let w = cfg(loud).backend_exposure_warning().unwrap_or_default();
            assert!(w.contains("neither loopback nor a private network"), "{loud}: {w}");
        }
        assert_eq!(parse(MIN).unwrap().backend_exposure_warning(), None, "the simulator");
    }

    #[test]
    fn an_https_upstream_takes_its_tls_settings() {
        let tls = "[backend.tls]\nca_file = \"/etc/edgeroute/gpu-ca.pem\"\ncert_file = \"/etc/edgeroute/gw.pem\"\nkey_file = \"/etc/edgeroute/gw.key\"\n";
        let https = format!(
            "{MIN}[backend]\nkind = \"openai\"\nurl = \"https://gpu.internal:8443\"\n{tls}"
        );
        let c = parse(&https).unwrap();
        let BackendConfig::Openai(o) = &c.backend else { panic!("openai") };
        let t = o.tls.as_ref().unwrap();
        assert_eq!(t.ca_file.as_deref(), Some(std::path::Path::new("/etc/edgeroute/gpu-ca.pem")));
        let plain = https.replace("https://", "http://");
        assert!(parse(&plain).unwrap_err().to_string().contains("backend.tls"));
        let typo = https.replace("ca_file", "ca_fiel");
        assert!(parse(&typo).is_err(), "unknown keys are errors");
    }
}
