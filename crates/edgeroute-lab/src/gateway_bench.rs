//! The gateway-overhead benchmark: the same open-loop load sent, in one run on loopback, to
//! the simulator backend directly, through the edgeroute gateway, through nginx as a
//! reference reverse proxy, and through LiteLLM's proxy (a Python AI gateway), for JSON and SSE
//! answers at each requested rate.
//!
//! LiteLLM is loaded only at rates up to [`GatewayBenchOpts::litellm_max_rate`]: one Python
//! worker saturated here at about 45 JSON or 22 streamed requests per second (2 cores shared
//! with the load generator), so at the gateway's rates its figures would be queueing, and its
//! runs would end only at the request timeout. The published configuration therefore has a
//! low rate (20 requests/s) at which all four targets are measured side by side.
//!
//! [`run`] starts every server as a child process (killed on drop, see
//! [`crate::process::ProcessGuard`]), waits for its health endpoint, checks one request per
//! target and mode, warms up, then loads the targets in turn, rotating their order each round
//! to spread drift (thermal, page cache, other tenants) evenly. [`GatewayBenchReport::to_markdown`]
//! renders the figures with the machine, the exact command, and every rate that was not
//! sustained marked as such.
//!
//! Beside chat, [`GatewayBenchOpts::endpoints`] adds the voice surface's endpoints (issue 19):
//! `/v1/embeddings` and `/v1/completions` (JSON), `/v1/audio/transcriptions` (a multipart
//! upload of a small WAV clip) and `/v1/audio/speech` (a WAV stream: time to its first byte
//! and to its end), each direct, through nginx and through the gateway (LiteLLM and the
//! router stay on chat). The simulator runs them at zero latency too (`--zero-latency` zeroes
//! transcription, speech and embedding delays as it does chat's), so only proxy overhead
//! remains.
//!
//! It reports; it asserts nothing about the figures. The load generator shares the machine's
//! cores with the servers, and the report says so.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::fleet::{FleetBackend, FleetSpec};
use crate::loadgen::{self, LoadReport, LoadSpec, Mode, Percentiles};
use crate::process::{ProcessGuard, tree_cpu_ns, tree_rss};

/// Which server a row measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TargetKind {
    /// The simulator backend, no proxy.
    Direct,
    /// `edgeroute node` in front of the same simulator.
    Gateway,
    /// `edgeroute router` in front of the same gateway (an `edgeroute discovery` process over
    /// that one node tells it where the node is).
    Router,
    /// nginx as a plain reverse proxy in front of the same simulator.
    Nginx,
    /// LiteLLM's proxy (`litellm --config`) in front of the same simulator.
    LiteLlm,
}

impl TargetKind {
    pub fn label(self) -> &'static str {
        match self {
            TargetKind::Direct => "direct (sim)",
            TargetKind::Gateway => "edgeroute gateway",
            TargetKind::Router => "edgeroute router",
            TargetKind::Nginx => "nginx",
            TargetKind::LiteLlm => "LiteLLM proxy",
        }
    }
}

/// A workload of the benchmark: chat (in each of [`GatewayBenchOpts::modes`]) or one of the
/// endpoints beside it (issue 19), each asked of the same model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Endpoint {
    Chat,
    /// `POST /v1/embeddings`: one input, a JSON answer.
    Embeddings,
    /// `POST /v1/completions`: one prompt, a JSON answer (not streamed).
    Completions,
    /// `POST /v1/audio/transcriptions`: a multipart upload of a [`UPLOAD_CLIP_S`] s WAV clip,
    /// a JSON transcript.
    Transcriptions,
    /// `POST /v1/audio/speech`: the prompt spoken as a WAV stream, timed to its first byte
    /// (first audio) and to its end.
    Speech,
}

/// The clip `/v1/audio/transcriptions` uploads: seconds at [`crate::voice::CLIP_RATE`] Hz.
pub const UPLOAD_CLIP_S: f64 = 1.0;

impl Endpoint {
    pub const ALL: [Endpoint; 5] = [
        Endpoint::Chat,
        Endpoint::Embeddings,
        Endpoint::Completions,
        Endpoint::Transcriptions,
        Endpoint::Speech,
    ];

    /// Its name on the command line (`--endpoints`).
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat",
            Endpoint::Embeddings => "embeddings",
            Endpoint::Completions => "completions",
            Endpoint::Transcriptions => "transcriptions",
            Endpoint::Speech => "speech",
        }
    }

    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => loadgen::CHAT_PATH,
            Endpoint::Embeddings => crate::voice::EMBEDDINGS_PATH,
            Endpoint::Completions => crate::voice::COMPLETIONS_PATH,
            Endpoint::Transcriptions => crate::voice::TRANSCRIPTIONS_PATH,
            Endpoint::Speech => crate::voice::SPEECH_PATH,
        }
    }

    /// `--endpoints`' value: names separated by commas, or `all`.
    pub fn parse_list(s: &str) -> Result<Vec<Endpoint>, String> {
        if s.trim() == "all" {
            return Ok(Endpoint::ALL.to_vec());
        }
        let mut out = Vec::new();
        for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let e: Endpoint = name.parse()?;
            if !out.contains(&e) {
                out.push(e);
            }
        }
        if out.is_empty() {
            return Err("no endpoint named".into());
        }
        Ok(out)
    }
}

impl std::str::FromStr for Endpoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Endpoint::ALL.into_iter().find(|e| e.name() == s).ok_or_else(|| {
            format!(
                "unknown endpoint {s:?} (expected chat, embeddings, completions, transcriptions, speech or all)"
            )
        })
    }
}

/// One workload's request: where it goes, its body and how its answer is read.
#[derive(Debug, Clone)]
pub struct Workload {
    pub endpoint: Endpoint,
    pub mode: Mode,
    pub content_type: String,
    pub body: Bytes,
}

impl Workload {
    /// The request for a non-chat `endpoint` (chat: [`Workload::chat`]): `model` everywhere,
    /// `prompt` as the embedding input, completion prompt and speech input.
    pub fn endpoint(
        endpoint: Endpoint,
        model: &str,
        prompt: &str,
        max_tokens: u32,
    ) -> anyhow::Result<Workload> {
        let json = |body: Bytes, mode: Mode| Workload {
            endpoint,
            mode,
            content_type: "application/json".into(),
            body,
        };
        Ok(match endpoint {
            Endpoint::Chat => bail!("chat's workloads come from its modes"),
            Endpoint::Embeddings => json(crate::voice::embeddings_body(model, prompt), Mode::Json),
            Endpoint::Completions => {
                json(crate::voice::completions_body(model, prompt, max_tokens), Mode::Json)
            }
            Endpoint::Speech => {
                json(crate::voice::speech_body(model, prompt, "alloy"), Mode::Bytes)
            }
            Endpoint::Transcriptions => {
                let clip = crate::voice::clip(1, UPLOAD_CLIP_S, crate::voice::CLIP_RATE);
                let (content_type, body) =
                    crate::voice::transcription_form(model, "clip.wav", &clip);
                Workload { endpoint, mode: Mode::Json, content_type, body }
            }
        })
    }

    /// Chat in `mode` (JSON or SSE).
    pub fn chat(
        model: &str,
        prompt: &str,
        max_tokens: u32,
        mode: Mode,
    ) -> anyhow::Result<Workload> {
        Ok(Workload {
            endpoint: Endpoint::Chat,
            mode,
            content_type: "application/json".into(),
            body: loadgen::chat_body(model, prompt, max_tokens, mode)?,
        })
    }

    /// Whether a successful answer's body is what the endpoint answers (checked once per
    /// target before loading it: a proxy that mangles an upload or an audio stream fails
    /// the run there). Chat's answers are checked by the load generator's own reading.
    pub fn check_answer(&self, body: &[u8]) -> Result<(), String> {
        let json = || serde_json::from_slice::<serde_json::Value>(body).map_err(|e| e.to_string());
        let ok = match self.endpoint {
            Endpoint::Chat => true,
            Endpoint::Embeddings => {
                json()?["data"][0]["embedding"].as_array().is_some_and(|v| !v.is_empty())
            }
            Endpoint::Completions => json()?["choices"][0]["text"].is_string(),
            Endpoint::Transcriptions => {
                crate::voice::transcript_text(body).is_some_and(|t| !t.trim().is_empty())
            }
            Endpoint::Speech => crate::voice::is_wav(body),
        };
        if ok {
            Ok(())
        } else {
            let head = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
            Err(format!("not a {} answer: {head:?}", self.endpoint.name()))
        }
    }
}

/// What to run. [`GatewayBenchOpts::new`] gives the published configuration.
#[derive(Debug, Clone)]
pub struct GatewayBenchOpts {
    /// The `edgeroute` binary (`sim`, `node` and `token mint` subcommands).
    pub edgeroute_bin: PathBuf,
    /// nginx for the reference row; `None` leaves it out.
    pub nginx_bin: Option<PathBuf>,
    /// nginx `worker_processes`.
    pub nginx_workers: u32,
    /// LiteLLM's `litellm` command (from `pip install 'litellm[proxy]'`, see
    /// `scripts/setup-litellm.sh`); `None` leaves it out.
    pub litellm_bin: Option<PathBuf>,
    /// LiteLLM's `--num_workers`.
    pub litellm_workers: u32,
    /// The highest rate LiteLLM is loaded at; phases above it have no LiteLLM row, and
    /// LiteLLM is not started when every rate is above it.
    pub litellm_max_rate: f64,
    /// How long LiteLLM gets to answer its liveness probe after it starts (it imports for
    /// several seconds before it listens).
    pub litellm_startup_timeout: Duration,
    /// The gateway's `node.worker_threads` (1: one event loop, like one nginx worker; 0: one
    /// thread per core).
    pub gateway_worker_threads: usize,
    /// Also measure `edgeroute router` (and its discovery replica) in front of the gateway:
    /// the router's added latency is its row minus the gateway's.
    pub router: bool,
    /// Chat's modes (JSON, SSE).
    pub modes: Vec<Mode>,
    /// The workloads: chat (in each of `modes`) and the endpoints beside it. Default: chat.
    pub endpoints: Vec<Endpoint>,
    /// Intended requests per second, one phase each.
    pub rates: Vec<f64>,
    /// Measured time per target and phase, split evenly over `rounds`.
    pub duration: Duration,
    /// Warm-up before each measured slice, excluded from the results.
    pub warmup: Duration,
    /// Interleaved rounds per phase; the target order rotates each round.
    pub rounds: u32,
    /// Keep-alive connections per target.
    pub connections: usize,
    pub model: String,
    pub prompt: String,
    pub max_tokens: u32,
    pub request_timeout: Duration,
    /// How long each server gets to answer `/health` after it starts.
    pub startup_timeout: Duration,
    /// Where configs and logs go. Given: kept after the run. `None`: a temporary directory,
    /// removed at the end.
    pub work_dir: Option<PathBuf>,
    /// The command line that ran the benchmark, quoted in the report.
    pub command: String,
}

impl GatewayBenchOpts {
    /// The published configuration: JSON and SSE at 20, 1,000 and 5,000 requests/s (LiteLLM
    /// at 20 only), 10 s measured per target and phase in 2 interleaved rounds, 32
    /// connections, nginx with 1 worker, LiteLLM with 1 worker. nginx and LiteLLM are
    /// included when installed where `scripts/bench.sh` puts them.
    pub fn new(edgeroute_bin: impl Into<PathBuf>) -> Self {
        let nginx = PathBuf::from("/usr/sbin/nginx");
        GatewayBenchOpts {
            edgeroute_bin: edgeroute_bin.into(),
            nginx_bin: nginx.exists().then_some(nginx),
            nginx_workers: 1,
            litellm_bin: default_litellm_bin(),
            // One worker, as LiteLLM's production guide recommends per container (scale with
            // replicas, not workers), and for parity with the gateway's one event loop and
            // nginx's one worker process on these 2 cores shared with the load generator.
            litellm_workers: 1,
            litellm_max_rate: 20.0,
            litellm_startup_timeout: Duration::from_secs(120),
            gateway_worker_threads: 1,
            router: false,
            modes: vec![Mode::Json, Mode::Stream],
            endpoints: vec![Endpoint::Chat],
            rates: vec![20.0, 1000.0, 5000.0],
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(2),
            rounds: 2,
            connections: 32,
            model: "sim-llama".into(),
            prompt: "Say hello in five words.".into(),
            max_tokens: 16,
            request_timeout: Duration::from_secs(10),
            startup_timeout: Duration::from_secs(20),
            work_dir: None,
            command: String::new(),
        }
    }
}

/// Where `scripts/setup-litellm.sh` installs LiteLLM's proxy:
/// `${EDGEROUTE_CACHE:-$HOME/.cache/edgeroute}/litellm-venv/bin/litellm`.
#[allow(clippy::disallowed_methods)] // A bench tool finding this machine's cache.
pub fn litellm_venv_bin() -> Option<PathBuf> {
    let cache = match std::env::var_os("EDGEROUTE_CACHE") {
        Some(c) if !c.is_empty() => PathBuf::from(c),
        _ => PathBuf::from(std::env::var_os("HOME")?).join(".cache/edgeroute"),
    };
    Some(cache.join("litellm-venv/bin/litellm"))
}

/// [`litellm_venv_bin`] when it is installed.
pub fn default_litellm_bin() -> Option<PathBuf> {
    litellm_venv_bin().filter(|p| p.exists())
}

/// Where the benchmark ran.
#[derive(Debug, Clone, Default)]
pub struct MachineInfo {
    pub nproc: usize,
    pub kernel: String,
    pub cpu: String,
}

impl MachineInfo {
    pub async fn detect() -> MachineInfo {
        let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
        let kernel = match tokio::process::Command::new("uname").arg("-r").output().await {
            Ok(out) if out.status.success() => {
                String::from_utf8_lossy(&out.stdout).trim().to_owned()
            }
            _ => std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_else(|_| "unknown".into()),
        };
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".into());
        MachineInfo { nproc, kernel, cpu }
    }
}

/// One server under test.
#[derive(Debug, Clone)]
pub struct TargetInfo {
    pub kind: TargetKind,
    pub addr: SocketAddr,
    pub pid: u32,
}

/// One target's figures in one phase.
#[derive(Debug, Clone)]
pub struct Row {
    pub target: TargetKind,
    pub load: LoadReport,
    /// RSS of the target's process tree before the phase's first round and after its last.
    pub rss_start: Option<u64>,
    pub rss_end: Option<u64>,
    /// CPU time of the target's process tree per request sent (warm-up included), in ns.
    pub cpu_per_request_ns: Option<u64>,
    /// Each round's own p99s, in round order (the merged `load` pools them).
    pub rounds: Vec<RoundP99>,
}

/// One round's p99s for one target, µs: its whole answers, and its first frames (SSE and
/// byte streams).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundP99 {
    pub total: u64,
    pub ttft: Option<u64>,
}

impl RoundP99 {
    fn of(load: &LoadReport) -> RoundP99 {
        let ttft = (!load.ttft.is_empty()).then(|| load.ttft.value_at_quantile(0.99));
        RoundP99 { total: load.latency.value_at_quantile(0.99), ttft }
    }
}

/// One workload (an endpoint, in a mode) at one rate, all its targets loaded at that rate.
#[derive(Debug, Clone)]
pub struct Phase {
    pub endpoint: Endpoint,
    pub mode: Mode,
    pub rate: f64,
    pub rows: Vec<Row>,
    /// The share of the machine's CPU time the hypervisor took during the phase (steal, in
    /// `/proc/stat`): a virtual machine's stalls land in every target's tail.
    pub steal: Option<f64>,
}

impl Phase {
    pub fn find(&self, kind: TargetKind) -> Option<&Row> {
        self.rows.iter().find(|r| r.target == kind)
    }
}

/// RSS of one server over the whole run.
#[derive(Debug, Clone)]
pub struct MemoryRow {
    pub target: TargetKind,
    /// After start-up checks and warm-up, before the first phase.
    pub before: Option<u64>,
    /// After the last phase.
    pub after: Option<u64>,
}

/// Everything the benchmark measured, plus what is needed to reproduce it.
#[derive(Debug, Clone)]
pub struct GatewayBenchReport {
    pub machine: MachineInfo,
    pub command: String,
    pub nginx_version: Option<String>,
    pub nginx_workers: u32,
    /// `Some` when LiteLLM was asked for (whether or not a rate allowed starting it).
    pub litellm: Option<LiteLlmInfo>,
    pub gateway_worker_threads: usize,
    pub connections: usize,
    pub duration: Duration,
    pub warmup: Duration,
    pub rounds: u32,
    pub model: String,
    pub max_tokens: u32,
    pub late_threshold: Duration,
    pub targets: Vec<TargetInfo>,
    pub phases: Vec<Phase>,
    /// Each workload's request and answer sizes (the answer as the direct target gave it).
    pub workloads: Vec<WorkloadInfo>,
    pub memory: Vec<MemoryRow>,
    pub gateway_config: String,
    pub nginx_config: Option<String>,
    /// With [`GatewayBenchOpts::router`]: the router's and its discovery replica's configs.
    pub router_configs: Option<RouterConfigs>,
}

/// A workload's sizes, for the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadInfo {
    pub endpoint: Endpoint,
    pub mode: Mode,
    pub request_bytes: usize,
    pub answer_bytes: usize,
}

/// The configs the router row ran with, for the report.
#[derive(Debug, Clone)]
pub struct RouterConfigs {
    pub router: String,
    pub discovery: String,
}

/// How LiteLLM ran, for the report.
#[derive(Debug, Clone)]
pub struct LiteLlmInfo {
    /// The installed `litellm` package version, e.g. `1.106.0`.
    pub version: Option<String>,
    pub workers: u32,
    pub max_rate: f64,
    /// The generated `config.yaml`, master key masked; `None` when LiteLLM was not started.
    pub config: Option<String>,
}

/// The gateway's configuration: a typed [`edgeroute_node::NodeConfig`], written as the
/// TOML file the `edgeroute node` process reads. Limits are set far above the offered load
/// (the whole load comes from one tenant, `bench`): the benchmark measures the request path,
/// not the limiter rejecting requests.
pub fn gateway_config(
    listen: SocketAddr,
    upstream_url: &str,
    secret_file: &Path,
    worker_threads: usize,
) -> edgeroute_node::NodeConfig {
    let mut cfg = gateway_fleet(upstream_url, secret_file).node_config(0, None);
    cfg.node.listen = listen;
    cfg.node.worker_threads = worker_threads;
    cfg.limits.max_concurrency = 100_000;
    cfg
}

/// The one-node fleet of the gateway row: `bench-gw` in region `local`, trusting HS256 tokens
/// signed with the secret in `secret_file`, in front of the simulator at `upstream_url`.
pub fn gateway_fleet(upstream_url: &str, secret_file: &Path) -> FleetSpec {
    let backend =
        FleetBackend::OpenAi { upstream: upstream_url.to_owned(), model: "sim-llama".into() };
    FleetSpec::single("bench-gw", 0, secret_file, backend)
}

/// A discovery replica that knows `fleet`'s nodes from its config (`[[nodes]]` at `urls`, no
/// bus), verifying callers as the fleet does, on `listen`: the text of its file.
pub fn static_discovery_toml(
    fleet: &FleetSpec,
    listen: SocketAddr,
    urls: &[String],
) -> anyhow::Result<String> {
    let region = fleet.regions.first().map_or("local", String::as_str);
    let mut cfg = fleet.static_discovery_config(region, urls);
    cfg.discovery.listen = listen;
    toml::to_string(&cfg).context("writing the discovery replica's config")
}

/// The router's `[limits]` in a benchmark. [`RouterLimits::OUT_OF_THE_WAY`] puts every one far
/// above the offered load (the whole load is one tenant's): a benchmark measures the request
/// path, not the limiter or the admission queue refusing requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouterLimits {
    pub rate_limit_per_s: u32,
    pub rate_limit_burst: u32,
    pub total_in_flight: u32,
    pub tenant_in_flight: u32,
    pub tenant_queue: u32,
}

impl RouterLimits {
    pub const OUT_OF_THE_WAY: RouterLimits = RouterLimits {
        rate_limit_per_s: 1_000_000,
        rate_limit_burst: 1_000_000,
        total_in_flight: 100_000,
        tenant_in_flight: 100_000,
        tenant_queue: 100_000,
    };
}

/// `edgeroute router`'s config (crates/edgeroute-router/src/config.rs) as the text of its
/// file: one replica on `listen` asking the discovery replica at `discovery_url`, tenants'
/// HS256 tokens verified with the secret in `secret_file` (the nodes' secret: the tenant's
/// token goes through to them), `limits`, and `jobs` as the body of a `[jobs]` section when
/// given.
pub fn router_config_toml(
    listen: SocketAddr,
    discovery_url: &str,
    secret_file: &Path,
    limits: RouterLimits,
    jobs: Option<&str>,
) -> String {
    let secret = toml_string(&secret_file.display().to_string());
    let RouterLimits {
        rate_limit_per_s,
        rate_limit_burst,
        total_in_flight,
        tenant_in_flight,
        tenant_queue,
    } = limits;
    let mut text = format!(
        "# Generated by edgeroute-lab.\n\
         [router]\nid = \"bench-router\"\nregion = \"local\"\nlisten = \"{listen}\"\n\
         discovery = [{discovery}]\n\n\
         [auth]\nhs256_secret_file = {secret}\n\n\
         [limits]\nrate_limit_per_s = {rate_limit_per_s}\nrate_limit_burst = {rate_limit_burst}\n\
         total_in_flight = {total_in_flight}\ntenant_in_flight = {tenant_in_flight}\n\
         tenant_queue = {tenant_queue}\n",
        discovery = toml_string(discovery_url),
    );
    if let Some(jobs) = jobs {
        let _ = write!(text, "\n[jobs]\n{jobs}");
        if !jobs.ends_with('\n') {
            text.push('\n');
        }
    }
    text
}

/// [`gateway_config`] as the text of its file.
pub fn gateway_config_toml(
    listen: SocketAddr,
    upstream_url: &str,
    secret_file: &Path,
    worker_threads: usize,
) -> anyhow::Result<String> {
    toml::to_string(&gateway_config(listen, upstream_url, secret_file, worker_threads))
        .context("writing the gateway's config")
}

/// A TOML basic string with quotes and backslashes escaped.
pub(crate) fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// nginx as a plain reverse proxy: HTTP/1.1 keep-alive to the upstream (so nginx does not
/// pay a connect per request, as the gateway does not), no buffering (SSE must flow frame
/// by frame), no access log, and keep-alive limits high enough that neither side closes
/// connections during the run. Every path nginx writes is inside `prefix`.
pub fn nginx_conf(listen: SocketAddr, upstream: SocketAddr, prefix: &Path, workers: u32) -> String {
    let p = prefix.display();
    format!(
        r#"# Generated by edgeroute-lab's gateway benchmark.
worker_processes {workers};
daemon off;
pid {p}/nginx.pid;
error_log {p}/error.log warn;

events {{
    worker_connections 4096;
}}

http {{
    access_log off;
    client_body_temp_path {p}/client_body;
    proxy_temp_path {p}/proxy;
    fastcgi_temp_path {p}/fastcgi;
    uwsgi_temp_path {p}/uwsgi;
    scgi_temp_path {p}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 300s;

    upstream sim {{
        server {upstream};
        keepalive 256;
        keepalive_requests 1000000;
        keepalive_timeout 300s;
    }}

    server {{
        listen {listen};
        location / {{
            proxy_pass http://sim;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
        }}
    }}
}}
"#
    )
}

/// LiteLLM's proxy configuration: `model` routed to the simulator's OpenAI-compatible API as
/// an `openai/` model (LiteLLM's generic OpenAI-compatible provider), the master key as the
/// only credential (parity with the gateway's JWT: every request is authenticated), no
/// database (so no virtual keys, spend or error logs to write), and no logging callbacks.
/// The listen address is given on the command line, not here.
///
/// What LiteLLM's production guide adds that is left out: a Postgres database and Redis (for
/// virtual keys, budgets and shared rate limits; the gateway keeps its limits in memory, and
/// with no database LiteLLM checks only the master key), Slack alerting, and JSON logs. Its
/// other recommendations are followed: one worker (`--num_workers 1`, see
/// [`GatewayBenchOpts::litellm_workers`]), debug logging off, `LITELLM_MODE=PRODUCTION` and
/// `LITELLM_LOG=ERROR` (set by [`run`] in the environment).
pub fn litellm_config_yaml(upstream: SocketAddr, model: &str, master_key: &str) -> String {
    // YAML's double-quoted scalars accept the escapes `toml_string` writes (\", \\, \uXXXX).
    let q = toml_string;
    format!(
        r#"# Generated by edgeroute-lab's gateway benchmark.
model_list:
  - model_name: {name}
    litellm_params:
      model: {provider_model}
      api_base: {api_base}
      # The simulator checks no key; LiteLLM's OpenAI client needs one all the same.
      api_key: "sk-bench-unused"

litellm_settings:
  set_verbose: false
  turn_off_message_logging: true
  callbacks: []
  success_callback: []
  failure_callback: []
  request_timeout: 30

general_settings:
  master_key: {master_key}
  disable_spend_logs: true
  disable_error_logs: true
  background_health_checks: false
"#,
        name = q(model),
        provider_model = q(&format!("openai/{model}")),
        api_base = q(&format!("http://{upstream}/v1")),
        master_key = q(master_key),
    )
}

/// A LiteLLM master key: `sk-` (LiteLLM requires the prefix) and 32 random bytes in hex.
fn litellm_master_key() -> anyhow::Result<String> {
    let mut raw = [0u8; 32];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut raw)?;
    Ok(format!("sk-bench-{}", raw.iter().map(|b| format!("{b:02x}")).collect::<String>()))
}

/// The `litellm` package version behind a `litellm` command: read from the `.dist-info`
/// directory of the venv it belongs to (`bin/../lib/python3.*/site-packages`), which is
/// instant, or else from `litellm --version`, which imports the whole package (~10 s).
async fn litellm_version(bin: &Path) -> Option<String> {
    let from_dist_info = || -> Option<String> {
        let venv = bin.parent()?.parent()?;
        for lib in std::fs::read_dir(venv.join("lib")).ok()?.flatten() {
            let site = lib.path().join("site-packages");
            let Ok(entries) = std::fs::read_dir(&site) else { continue };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(v) =
                    name.strip_prefix("litellm-").and_then(|r| r.strip_suffix(".dist-info"))
                {
                    return Some(v.to_owned());
                }
            }
        }
        None
    };
    if let Some(v) = from_dist_info() {
        return Some(v);
    }
    let mut cmd = tokio::process::Command::new(bin);
    cmd.arg("--version").env("LITELLM_LOCAL_MODEL_COST_MAP", "True").kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output()).await.ok()?.ok()?;
    // "LiteLLM: Current Version = 1.106.0"
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().find_map(|l| l.split_once("Current Version = ")).map(|(_, v)| v.trim().to_owned())
}

fn free_port() -> std::io::Result<u16> {
    // Bind, read the port, release it. Another process may take it in between; starts
    // are retried on another port when the server exits early.
    Ok(std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()?.port())
}

/// `GET path` on a fresh connection; `None` on any failure.
async fn get_status(addr: SocketAddr, path: &str, timeout: Duration) -> Option<StatusCode> {
    let req = HttpCall::new(http::Method::GET, path);
    http_call(addr, req, timeout).await.map(|(status, _)| status)
}

/// One request for [`http_call`].
#[derive(Debug, Clone)]
pub(crate) struct HttpCall<'a> {
    pub method: http::Method,
    pub path: &'a str,
    pub bearer: Option<&'a str>,
    pub content_type: Option<&'a str>,
    pub body: Bytes,
}

impl<'a> HttpCall<'a> {
    pub fn new(method: http::Method, path: &'a str) -> Self {
        HttpCall { method, path, bearer: None, content_type: None, body: Bytes::new() }
    }
}

/// One request on a fresh HTTP/1.1 connection to a loopback server: its status and whole
/// body, or `None` on any failure (connect, I/O, `timeout`).
pub(crate) async fn http_call(
    addr: SocketAddr,
    call: HttpCall<'_>,
    timeout: Duration,
) -> Option<(StatusCode, Bytes)> {
    let attempt = async {
        let stream = TcpStream::connect(addr).await.ok()?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.ok()?;
        let driver = tokio::spawn(conn);
        let mut req = Request::builder()
            .method(call.method)
            .uri(call.path)
            .header(http::header::HOST, addr.to_string());
        if let Some(token) = call.bearer {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        if let Some(ct) = call.content_type {
            req = req.header(http::header::CONTENT_TYPE, ct);
        }
        let req = req.body(Full::new(call.body)).ok()?;
        let resp = sender.send_request(req).await.ok()?;
        let status = resp.status();
        let body = resp.into_body().collect().await.ok()?.to_bytes();
        driver.abort();
        Some((status, body))
    };
    tokio::time::timeout(timeout, attempt).await.ok().flatten()
}

/// Starts a server on a free port and waits until `GET health` answers 200. A server that
/// exits during start-up (most likely: the port was taken meanwhile) is retried on another
/// port, twice.
pub(crate) async fn start_server(
    guard: &mut ProcessGuard,
    name: &str,
    log: &Path,
    health: &str,
    startup_timeout: Duration,
    mut make: impl FnMut(SocketAddr) -> anyhow::Result<Command>,
) -> anyhow::Result<(SocketAddr, u32)> {
    const ATTEMPTS: u32 = 3;
    for attempt in 1..=ATTEMPTS {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        let cmd = make(addr)?;
        let program = format!("{cmd:?}");
        let pid = guard.spawn(name, cmd, log).with_context(|| format!("starting {program}"))?;
        let deadline = Instant::now() + startup_timeout;
        loop {
            if let Some(status) = guard.exited(name) {
                let tail = guard.log_tail(name);
                guard.stop(name);
                if attempt == ATTEMPTS {
                    bail!("{name} ({program}) exited during start-up with {status}; log:\n{tail}");
                }
                break;
            }
            if get_status(addr, health, Duration::from_secs(1)).await == Some(StatusCode::OK) {
                return Ok((addr, pid));
            }
            if Instant::now() > deadline {
                let tail = guard.log_tail(name);
                bail!(
                    "{name} ({program}) did not answer GET {health} with 200 within {startup_timeout:?}; log:\n{tail}"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Err(anyhow!("{name} could not be started"))
}

/// Runs `edgeroute token mint` and returns the JWT it prints.
pub(crate) async fn mint_token(bin: &Path, secret_file: &Path) -> anyhow::Result<String> {
    mint_token_for(bin, secret_file, "bench").await
}

/// Runs `edgeroute token mint` for tenant `sub` and returns the JWT it prints.
pub(crate) async fn mint_token_for(
    bin: &Path,
    secret_file: &Path,
    sub: &str,
) -> anyhow::Result<String> {
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args(["token", "mint", "--secret-file"])
        .arg(secret_file)
        .args(["--sub", sub, "--scope", "inference"])
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .context("`token mint` did not finish in 30 s")?
        .with_context(|| format!("running {} token mint", bin.display()))?;
    if !out.status.success() {
        bail!(
            "`{} token mint` failed with {}: {}",
            bin.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let stdout = String::from_utf8(out.stdout).context("`token mint` printed non-UTF-8")?;
    // The token is the last non-empty line, in case the command prints anything before it.
    let token = stdout.lines().map(str::trim).rfind(|l| !l.is_empty()).unwrap_or_default();
    if token.is_empty() || token.contains(char::is_whitespace) {
        bail!("`token mint` printed no token: {stdout:?}");
    }
    Ok(token.to_owned())
}

async fn nginx_version(bin: &Path) -> Option<String> {
    let out = tokio::process::Command::new(bin).arg("-v").output().await.ok()?;
    // nginx prints its version on stderr: "nginx version: nginx/1.22.1".
    let text = String::from_utf8_lossy(&out.stderr);
    text.lines().find_map(|l| l.strip_prefix("nginx version: ")).map(str::to_owned)
}

pub(crate) fn write_secret(path: &Path) -> anyhow::Result<()> {
    let mut raw = [0u8; 32];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut raw)?;
    // Hex keeps the file printable, whether the reader takes it as text or as bytes.
    let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(path, hex)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

/// `litellm --config ... --host ... --port ... --num_workers N`, with the environment LiteLLM's
/// production guide asks for and nothing that reaches beyond loopback.
fn litellm_command(
    bin: &Path,
    config: &Path,
    prefix: &Path,
    addr: SocketAddr,
    opts: &GatewayBenchOpts,
) -> Command {
    let mut c = Command::new(bin);
    c.arg("--config")
        .arg(config)
        .arg("--host")
        .arg(addr.ip().to_string())
        .arg("--port")
        .arg(addr.port().to_string())
        .arg("--num_workers")
        .arg(opts.litellm_workers.to_string());
    // PRODUCTION: no `.env` loading. LITELLM_LOG=ERROR: no per-request access log (nginx runs
    // with `access_log off`) and no debug logging. The local model cost map: LiteLLM otherwise
    // fetches it from the internet at start-up, which is unreachable here and only delays it.
    c.env("LITELLM_MODE", "PRODUCTION")
        .env("LITELLM_LOG", "ERROR")
        .env("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        // No database, whatever the caller's environment says.
        .env_remove("DATABASE_URL")
        .env_remove("DIRECT_URL")
        // Proxies for loopback traffic would add a hop (and are not wanted for the sim).
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost")
        .current_dir(prefix);
    c
}

/// The servers of one run and how to reach them.
struct Targets {
    list: Vec<TargetInfo>,
    token: String,
    litellm_key: Option<String>,
}

impl Targets {
    /// The credential each target requires: the gateway's JWT, LiteLLM's master key.
    fn bearer(&self, kind: TargetKind) -> Option<&str> {
        match kind {
            TargetKind::Gateway | TargetKind::Router => Some(&self.token),
            TargetKind::LiteLlm => self.litellm_key.as_deref(),
            TargetKind::Direct | TargetKind::Nginx => None,
        }
    }

    /// Whether `t` is loaded with `endpoint` at `rate`: LiteLLM only up to its cap, LiteLLM
    /// and the router only with chat.
    fn loaded_at(
        &self,
        t: &TargetInfo,
        opts: &GatewayBenchOpts,
        endpoint: Endpoint,
        rate: f64,
    ) -> bool {
        match t.kind {
            TargetKind::LiteLlm => endpoint == Endpoint::Chat && rate <= opts.litellm_max_rate,
            TargetKind::Router => endpoint == Endpoint::Chat,
            TargetKind::Direct | TargetKind::Gateway | TargetKind::Nginx => true,
        }
    }

    fn spec(&self, t: &TargetInfo, opts: &GatewayBenchOpts, w: &Workload, rate: f64) -> LoadSpec {
        let mut spec = LoadSpec::new(format!("http://{}", t.addr), w.body.clone(), w.mode, rate);
        if w.endpoint != Endpoint::Chat {
            spec.path = Some(w.endpoint.path().to_owned());
            spec.content_type = Some(w.content_type.clone());
        }
        spec.bearer = self.bearer(t.kind).map(str::to_owned);
        spec.connections = opts.connections;
        spec.warmup = opts.warmup;
        spec.request_timeout = opts.request_timeout;
        spec
    }
}

/// A server this module started: where it listens, its pid, the config it read.
pub(crate) struct Started {
    pub addr: SocketAddr,
    pub pid: u32,
    pub config: String,
}

/// Starts `edgeroute discovery` (process `discovery` in `guard`, config and log in `dir`) over
/// `fleet`'s nodes as static `[[nodes]]` at `urls`, and waits until it lists every one of them
/// for `model` to `token`'s tenant: a router asking before that would find no node.
#[allow(clippy::too_many_arguments)] // One call per bench, each argument named there.
pub(crate) async fn start_static_discovery(
    guard: &mut ProcessGuard,
    dir: &Path,
    bin: &Path,
    fleet: &FleetSpec,
    urls: &[String],
    model: &str,
    token: &str,
    startup_timeout: Duration,
) -> anyhow::Result<Started> {
    let Started { addr, pid, config } =
        start_configured(guard, dir, bin, "discovery", startup_timeout, |addr| {
            static_discovery_toml(fleet, addr, urls)
        })
        .await?;
    let query = format!("/v1/discover?model={model}&k={}", urls.len().max(1));
    let deadline = Instant::now() + startup_timeout;
    loop {
        let mut call = HttpCall::new(http::Method::GET, &query);
        call.bearer = Some(token);
        let listed =
            http_call(addr, call, Duration::from_secs(1)).await.and_then(|(status, body)| {
                let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
                Some((status, v["candidates"].as_array().map_or(0, Vec::len)))
            });
        if let Some((StatusCode::OK, n)) = listed
            && n >= urls.len()
        {
            return Ok(Started { addr, pid, config });
        }
        if Instant::now() > deadline {
            bail!(
                "discovery did not list the {} node(s) within {startup_timeout:?} (last answer: {listed:?}); log:\n{}",
                urls.len(),
                guard.log_tail("discovery")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts `edgeroute router` (process `router` in `guard`, config and log in `dir`) asking the
/// discovery replica at `discovery`, verifying tokens with `secret_file`, with `limits` and
/// the `[jobs]` body `jobs`.
#[allow(clippy::too_many_arguments)] // One call per bench, each argument named there.
pub(crate) async fn start_router(
    guard: &mut ProcessGuard,
    dir: &Path,
    bin: &Path,
    discovery: SocketAddr,
    secret_file: &Path,
    limits: RouterLimits,
    jobs: Option<&str>,
    startup_timeout: Duration,
) -> anyhow::Result<Started> {
    let discovery_url = format!("http://{discovery}");
    start_configured(guard, dir, bin, "router", startup_timeout, |addr| {
        Ok(router_config_toml(addr, &discovery_url, secret_file, limits, jobs))
    })
    .await
}

/// Starts `edgeroute <name> --config <dir>/<name>.toml` (process `name` in `guard`, its log
/// `<dir>/<name>.log`) with the config `config` writes for the address it is given, and
/// waits for its `/health`.
pub(crate) async fn start_configured(
    guard: &mut ProcessGuard,
    dir: &Path,
    bin: &Path,
    name: &str,
    startup_timeout: Duration,
    mut config: impl FnMut(SocketAddr) -> anyhow::Result<String>,
) -> anyhow::Result<Started> {
    let path = dir.join(format!("{name}.toml"));
    let log = dir.join(format!("{name}.log"));
    let subcommand = name.split('-').next().unwrap_or(name);
    let mut text = String::new();
    let (addr, pid) = start_server(guard, name, &log, "/health", startup_timeout, |addr| {
        text = config(addr)?;
        std::fs::write(&path, &text)?;
        let mut c = Command::new(bin);
        c.arg(subcommand).arg("--config").arg(&path);
        Ok(c)
    })
    .await?;
    Ok(Started { addr, pid, config: text })
}

fn check_alive(guard: &mut ProcessGuard) -> anyhow::Result<()> {
    match guard.first_exited() {
        Some((name, status, tail)) => {
            bail!("{name} exited during the benchmark with {status}; log:\n{tail}")
        }
        None => Ok(()),
    }
}

/// Runs the whole benchmark. Every child process is stopped before this returns, on
/// success and on error alike.
pub async fn run(opts: GatewayBenchOpts) -> anyhow::Result<GatewayBenchReport> {
    if opts.rates.is_empty() || opts.endpoints.is_empty() {
        bail!("at least one rate and one endpoint are needed");
    }
    if opts.endpoints.contains(&Endpoint::Chat) && opts.modes.is_empty() {
        bail!("chat needs at least one mode");
    }
    if opts.rates.iter().any(|r| !(r.is_finite() && *r > 0.0)) {
        bail!("rates must be positive: {:?}", opts.rates);
    }
    if opts.rounds == 0 || opts.connections == 0 || opts.duration.is_zero() {
        bail!("rounds, connections and duration must be positive");
    }
    let machine = MachineInfo::detect().await;
    let (temp, dir) = work_dir(opts.work_dir.as_deref(), "edgeroute-gwbench-")?;
    let mut guard = ProcessGuard::new();
    let result = run_with(&opts, &dir, &mut guard, machine).await;
    finish(guard, temp, result).await
}

/// The run's work directory: `given` (created, kept), or a temporary one named `prefix…`
/// (removed by dropping the returned guard, after the children are gone: see [`finish`]).
pub(crate) fn work_dir(
    given: Option<&Path>,
    prefix: &str,
) -> anyhow::Result<(Option<tempfile::TempDir>, PathBuf)> {
    if let Some(d) = given {
        std::fs::create_dir_all(d)?;
        return Ok((None, d.to_owned()));
    }
    let t = tempfile::Builder::new().prefix(prefix).tempdir()?;
    // nginx workers run unprivileged when the master is root: let them reach their prefix
    // inside this otherwise owner-only directory. The secret stays 0600.
    std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755))?;
    let path = t.path().to_owned();
    Ok((Some(t), path))
}

/// Stops every child (off the async threads: termination waits up to a few seconds), then
/// removes the temporary work directory, and returns the run's result.
pub(crate) async fn finish<T>(
    guard: ProcessGuard,
    temp: Option<tempfile::TempDir>,
    result: anyhow::Result<T>,
) -> anyhow::Result<T> {
    let stopped = tokio::task::spawn_blocking(move || drop(guard)).await;
    let report = result?;
    stopped.context("stopping the servers")?;
    drop(temp);
    Ok(report)
}

async fn run_with(
    opts: &GatewayBenchOpts,
    dir: &Path,
    guard: &mut ProcessGuard,
    machine: MachineInfo,
) -> anyhow::Result<GatewayBenchReport> {
    let bin = &opts.edgeroute_bin;
    let (sim_addr, sim_pid) =
        start_server(guard, "sim", &dir.join("sim.log"), "/health", opts.startup_timeout, |addr| {
            let mut c = Command::new(bin);
            c.arg("sim").arg("--listen").arg(addr.to_string()).arg("--zero-latency");
            Ok(c)
        })
        .await?;
    let mut list = vec![TargetInfo { kind: TargetKind::Direct, addr: sim_addr, pid: sim_pid }];

    let secret = dir.join("hs256.secret");
    write_secret(&secret)?;
    let token = mint_token(bin, &secret).await?;
    let upstream = format!("http://{sim_addr}");
    let config_path = dir.join("gateway.toml");
    let mut gateway_config = String::new();
    let (gw_addr, gw_pid) = start_server(
        guard,
        "gateway",
        &dir.join("gateway.log"),
        "/health",
        opts.startup_timeout,
        |addr| {
            gateway_config =
                gateway_config_toml(addr, &upstream, &secret, opts.gateway_worker_threads)?;
            std::fs::write(&config_path, &gateway_config)?;
            let mut c = Command::new(bin);
            c.arg("node").arg("--config").arg(&config_path);
            Ok(c)
        },
    )
    .await?;
    list.push(TargetInfo { kind: TargetKind::Gateway, addr: gw_addr, pid: gw_pid });

    let mut router_configs = None;
    // The router serves chat here: without chat it has nothing to be measured with.
    if opts.router && opts.endpoints.contains(&Endpoint::Chat) {
        let fleet = gateway_fleet(&upstream, &secret);
        let urls = [format!("http://{gw_addr}")];
        let disc = start_static_discovery(
            guard,
            dir,
            bin,
            &fleet,
            &urls,
            &opts.model,
            &token,
            opts.startup_timeout,
        )
        .await?;
        let limits = RouterLimits::OUT_OF_THE_WAY;
        let router =
            start_router(guard, dir, bin, disc.addr, &secret, limits, None, opts.startup_timeout)
                .await?;
        list.push(TargetInfo { kind: TargetKind::Router, addr: router.addr, pid: router.pid });
        router_configs = Some(RouterConfigs { router: router.config, discovery: disc.config });
    }

    let mut nginx_config = None;
    let mut nginx_version_text = None;
    if let Some(nginx) = &opts.nginx_bin {
        nginx_version_text = nginx_version(nginx).await;
        let prefix = dir.join("nginx");
        std::fs::create_dir_all(&prefix)?;
        std::fs::set_permissions(&prefix, std::fs::Permissions::from_mode(0o755))?;
        let conf_path = prefix.join("nginx.conf");
        let mut conf_text = String::new();
        let (addr, pid) = start_server(
            guard,
            "nginx",
            &dir.join("nginx.log"),
            "/health",
            opts.startup_timeout,
            |addr| {
                conf_text = nginx_conf(addr, sim_addr, &prefix, opts.nginx_workers);
                std::fs::write(&conf_path, &conf_text)?;
                let mut c = Command::new(nginx);
                c.arg("-p").arg(&prefix).arg("-c").arg(&conf_path);
                c.arg("-e").arg(prefix.join("error.log"));
                Ok(c)
            },
        )
        .await?;
        nginx_config = Some(conf_text);
        list.push(TargetInfo { kind: TargetKind::Nginx, addr, pid });
    }

    let mut litellm = None;
    let mut litellm_key = None;
    if let Some(litellm_bin) = &opts.litellm_bin {
        let mut info = LiteLlmInfo {
            version: litellm_version(litellm_bin).await,
            workers: opts.litellm_workers,
            max_rate: opts.litellm_max_rate,
            config: None,
        };
        let chat = opts.endpoints.contains(&Endpoint::Chat);
        if chat && opts.rates.iter().any(|&r| r <= opts.litellm_max_rate) {
            let key = litellm_master_key()?;
            let prefix = dir.join("litellm");
            std::fs::create_dir_all(&prefix)?;
            let conf_path = prefix.join("config.yaml");
            std::fs::write(&conf_path, litellm_config_yaml(sim_addr, &opts.model, &key))?;
            std::fs::set_permissions(&conf_path, std::fs::Permissions::from_mode(0o600))?;
            let (addr, pid) = start_server(
                guard,
                "litellm",
                &dir.join("litellm.log"),
                // Open, and answered by the proxy itself: `/health` would need the master key
                // and calls every model.
                "/health/liveliness",
                opts.litellm_startup_timeout,
                |addr| Ok(litellm_command(litellm_bin, &conf_path, &prefix, addr, opts)),
            )
            .await?;
            info.config = Some(litellm_config_yaml(sim_addr, &opts.model, "sk-<random per run>"));
            litellm_key = Some(key);
            list.push(TargetInfo { kind: TargetKind::LiteLlm, addr, pid });
        }
        litellm = Some(info);
    }
    let targets = Targets { list, token, litellm_key };

    let mut workloads = Vec::new();
    for &endpoint in &opts.endpoints {
        if endpoint == Endpoint::Chat {
            for &mode in &opts.modes {
                workloads.push(Workload::chat(&opts.model, &opts.prompt, opts.max_tokens, mode)?);
            }
        } else {
            workloads.push(Workload::endpoint(
                endpoint,
                &opts.model,
                &opts.prompt,
                opts.max_tokens,
            )?);
        }
    }
    let loaded =
        |t: &TargetInfo, w: &Workload, rate: f64| targets.loaded_at(t, opts, w.endpoint, rate);
    // LiteLLM is started only when the lowest rate is within its cap.
    let warm_rate = opts.rates.iter().copied().fold(f64::INFINITY, f64::min);

    // One request per target and workload first: a misconfigured target (401, 404, a stream
    // without [DONE], a mangled upload or audio stream) should fail here with its answer, not
    // as a table of errors.
    let mut infos = Vec::new();
    for w in &workloads {
        let mut answer_bytes = 0;
        for t in targets.list.iter().filter(|t| loaded(t, w, warm_rate)) {
            let what = || format!("checking {} ({} {})", t.kind.label(), w.endpoint.name(), w.mode);
            let probe = loadgen::probe_spec(&targets.spec(t, opts, w, 1.0), opts.request_timeout)
                .await
                .with_context(what)?;
            w.check_answer(&probe.body).map_err(|e| anyhow!(e)).with_context(what)?;
            if t.kind == TargetKind::Direct {
                answer_bytes = probe.body.len();
            }
        }
        infos.push(WorkloadInfo {
            endpoint: w.endpoint,
            mode: w.mode,
            request_bytes: w.body.len(),
            answer_bytes,
        });
    }

    // Warm every target at the lowest rate: connection pools, allocator arenas, caches.
    for w in &workloads {
        for t in targets.list.iter().filter(|t| loaded(t, w, warm_rate)) {
            let mut spec = targets.spec(t, opts, w, warm_rate);
            spec.duration = opts.warmup.max(Duration::from_millis(100));
            spec.warmup = Duration::ZERO;
            loadgen::run(&spec).await.with_context(|| format!("warming up {}", t.kind.label()))?;
        }
    }
    check_alive(guard)?;
    let memory_before: Vec<Option<u64>> = targets.list.iter().map(|t| tree_rss(t.pid)).collect();

    let slice = opts.duration / opts.rounds;
    let mut phases = Vec::new();
    for w in &workloads {
        let (endpoint, mode) = (w.endpoint, w.mode);
        for &rate in &opts.rates {
            let rss_start: Vec<Option<u64>> =
                targets.list.iter().map(|t| tree_rss(t.pid)).collect();
            let ticks_start = crate::process::cpu_ticks();
            let mut acc: Vec<Option<LoadReport>> = vec![None; targets.list.len()];
            // (CPU ns, requests sent) per target over the phase's rounds.
            let mut cpu: Vec<Option<(u64, u64)>> = vec![None; targets.list.len()];
            let mut rounds: Vec<Vec<RoundP99>> = vec![Vec::new(); targets.list.len()];
            let loaded: Vec<usize> =
                (0..targets.list.len()).filter(|&i| loaded(&targets.list[i], w, rate)).collect();
            for round in 0..opts.rounds {
                let n = loaded.len();
                for k in 0..n {
                    let i = loaded[(k + round as usize) % n];
                    let t = &targets.list[i];
                    let mut spec = targets.spec(t, opts, w, rate);
                    spec.duration = slice;
                    let warm = (spec.warmup.as_secs_f64() * rate).ceil() as u64;
                    let cpu_before = tree_cpu_ns(t.pid);
                    let rep = loadgen::run(&spec).await.with_context(|| {
                        format!(
                            "loading {} ({} {mode}, {rate} req/s)",
                            t.kind.label(),
                            endpoint.name()
                        )
                    })?;
                    if let (Some(a), Some(b)) = (cpu_before, tree_cpu_ns(t.pid)) {
                        let (ns, n) = cpu[i].get_or_insert((0, 0));
                        *ns += b.saturating_sub(a);
                        *n += rep.scheduled + warm;
                    }
                    check_alive(guard)?;
                    rounds[i].push(RoundP99::of(&rep));
                    match &mut acc[i] {
                        Some(a) => a.merge(&rep)?,
                        slot => *slot = Some(rep),
                    }
                }
            }
            let rows = targets
                .list
                .iter()
                .zip(acc)
                .zip(rss_start)
                .zip(cpu)
                .zip(rounds)
                .filter_map(|((((t, load), rss_start), cpu), rounds)| {
                    Some(Row {
                        target: t.kind,
                        load: load?,
                        rss_start,
                        rss_end: tree_rss(t.pid),
                        cpu_per_request_ns: cpu.and_then(|(ns, n)| ns.checked_div(n)),
                        rounds,
                    })
                })
                .collect();
            let steal = ticks_start
                .zip(crate::process::cpu_ticks())
                .and_then(|(a, b)| crate::process::steal_share(a, b));
            phases.push(Phase { endpoint, mode, rate, rows, steal });
        }
    }
    let memory = targets
        .list
        .iter()
        .zip(memory_before)
        .map(|(t, before)| MemoryRow { target: t.kind, before, after: tree_rss(t.pid) })
        .collect();

    Ok(GatewayBenchReport {
        machine,
        command: opts.command.clone(),
        nginx_version: nginx_version_text,
        nginx_workers: opts.nginx_workers,
        litellm,
        gateway_worker_threads: opts.gateway_worker_threads,
        connections: opts.connections,
        duration: opts.duration,
        warmup: opts.warmup,
        rounds: opts.rounds,
        model: opts.model.clone(),
        max_tokens: opts.max_tokens,
        late_threshold: loadgen::DEFAULT_LATE_THRESHOLD,
        targets: targets.list,
        phases,
        workloads: infos,
        memory,
        gateway_config,
        nginx_config,
        router_configs,
    })
}

fn fmt_us(us: u64) -> String {
    if us < 1_000 {
        format!("{us} µs")
    } else if us < 1_000_000 {
        format!("{:.2} ms", us as f64 / 1e3)
    } else {
        format!("{:.2} s", us as f64 / 1e6)
    }
}

fn fmt_delta(us: i128) -> String {
    let sign = if us < 0 { "−" } else { "+" };
    format!("{sign}{}", fmt_us(u64::try_from(us.unsigned_abs()).unwrap_or(u64::MAX)))
}

/// `a ÷ b` for two added latencies; "—" when `b` is not positive (the gateway added nothing
/// measurable, so no multiple of it means anything).
fn fmt_ratio(a: i128, b: i128) -> String {
    if b <= 0 {
        return "—".into();
    }
    let r = a as f64 / b as f64;
    if r.abs() >= 10.0 { format!("{r:.0}×") } else { format!("{r:.1}×") }
}

fn fmt_mib(bytes: Option<u64>) -> String {
    match bytes {
        Some(b) => format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0)),
        None => "?".into(),
    }
}

fn fmt_secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 { format!("{s:.0} s") } else { format!("{s} s") }
}

fn fmt_rate(r: f64) -> String {
    // Thousands separators make 1,000 vs 5,000 easy to read in a table.
    let n = r.round() as u64;
    let digits = n.to_string();
    let mut groups: Vec<&str> =
        digits.as_bytes().rchunks(3).filter_map(|g| std::str::from_utf8(g).ok()).collect();
    groups.reverse();
    groups.join(",")
}

/// Which latency a table shows.
#[derive(Clone, Copy)]
enum Metric {
    /// Full answer (JSON) or `data: [DONE]` (SSE).
    Total,
    /// First content frame (SSE).
    Ttft,
}

impl Metric {
    /// The latencies a summary line is given for in each mode, with their names.
    fn summarized(mode: Mode) -> &'static [(Metric, &'static str)] {
        match mode {
            Mode::Json | Mode::Get => &[(Metric::Total, "JSON")],
            Mode::Stream => &[(Metric::Ttft, "SSE first token"), (Metric::Total, "SSE [DONE]")],
            Mode::Bytes => &[(Metric::Ttft, "first byte"), (Metric::Total, "whole answer")],
        }
    }

    /// A non-chat phase's latencies, named with its endpoint.
    fn of_endpoint(endpoint: Endpoint) -> &'static [(Metric, &'static str)] {
        match endpoint {
            Endpoint::Chat => &[],
            Endpoint::Embeddings => &[(Metric::Total, "`/v1/embeddings`")],
            Endpoint::Completions => &[(Metric::Total, "`/v1/completions`")],
            Endpoint::Transcriptions => &[(Metric::Total, "`/v1/audio/transcriptions`")],
            Endpoint::Speech => &[
                (Metric::Ttft, "`/v1/audio/speech`, first audio byte"),
                (Metric::Total, "`/v1/audio/speech`, whole audio"),
            ],
        }
    }

    fn of(self, load: &LoadReport) -> Percentiles {
        match self {
            Metric::Total => load.latency_percentiles(),
            Metric::Ttft => load.ttft_percentiles().unwrap_or_default(),
        }
    }

    /// One round's p99 of this latency.
    fn of_round(self, r: &RoundP99) -> Option<u64> {
        match self {
            Metric::Total => Some(r.total),
            Metric::Ttft => r.ttft,
        }
    }
}

/// Gateway minus nginx p99, round by round (µs; the direct target's p99 cancels out of the
/// difference of added figures): one figure per interleaved round, so a stall that hit one
/// target's slice shows as one outlier instead of moving the pooled p99. `None` with fewer
/// than two rounds, or when a round lacks the latency.
fn round_differences(gateway: &Row, nginx: &Row, metric: Metric) -> Option<Vec<i128>> {
    if gateway.rounds.len() < 2 || gateway.rounds.len() != nginx.rounds.len() {
        return None;
    }
    gateway
        .rounds
        .iter()
        .zip(&nginx.rounds)
        .map(|(g, n)| Some(i128::from(metric.of_round(g)?) - i128::from(metric.of_round(n)?)))
        .collect()
}

/// `diffs` as a sentence: each round's figure, how many are at or below zero, the median, and
/// (from six rounds on) the median's distribution-free 95 % interval with what it says: a
/// median above or below zero by less than the rounds' spread is not a difference this run
/// can tell from noise.
fn round_sentence(diffs: &[i128]) -> String {
    let mut sorted = diffs.to_vec();
    sorted.sort_unstable();
    let median = if sorted.len() % 2 == 1 {
        sorted[sorted.len() / 2]
    } else {
        (sorted[sorted.len() / 2 - 1] + sorted[sorted.len() / 2]) / 2
    };
    let list: Vec<String> = diffs.iter().map(|&d| fmt_delta(d)).collect();
    let interval = match median_interval(&sorted) {
        Some((lo, hi, coverage)) => format!(
            "; the median's interval (order statistics, {:.1} % confidence) {} to {}: {}",
            coverage * 100.0,
            fmt_delta(lo),
            fmt_delta(hi),
            if hi <= 0 {
                "the gateway is at or below nginx"
            } else if lo > 0 {
                "the gateway is above nginx"
            } else {
                "not told apart at this many rounds"
            }
        ),
        None => String::new(),
    };
    format!(
        "Round by round (each round's own p99, targets interleaved), gateway − nginx: {}; the gateway at or below nginx in {} of {} rounds, median {}{}.",
        list.join(", "),
        diffs.iter().filter(|&&d| d <= 0).count(),
        diffs.len(),
        fmt_delta(median),
        interval
    )
}

/// The median's distribution-free confidence interval from `sorted` samples: the order
/// statistics x₍ₖ₎ and x₍ₙ₊₁₋ₖ₎ for the largest k whose coverage, 1 − 2·P(Binomial(n, ½) < k),
/// is still at least 95 %; with the coverage. `None` below six samples, where no such k exists.
fn median_interval(sorted: &[i128]) -> Option<(i128, i128, f64)> {
    let n = sorted.len();
    // P(B = i) by the recurrence C(n, i + 1) = C(n, i)·(n − i)/(i + 1), from 2⁻ⁿ.
    let mut p = 0.5f64.powi(i32::try_from(n).ok()?);
    let mut below = 0.0; // P(B ≤ i)
    let mut found = None;
    for i in 0..n / 2 {
        below += p;
        let coverage = 1.0 - 2.0 * below;
        if coverage < 0.95 {
            break;
        }
        // k = i + 1 (1-based): x₍ᵢ₊₁₎ and x₍ₙ₋ᵢ₎.
        found = Some((sorted[i], sorted[n - 1 - i], coverage));
        p = p * (n - i) as f64 / (i + 1) as f64;
    }
    found
}

impl GatewayBenchReport {
    fn target_line(&self, t: &TargetInfo) -> String {
        match t.kind {
            TargetKind::Direct => format!(
                "direct: `edgeroute sim --listen {} --zero-latency` (pid {})",
                t.addr, t.pid
            ),
            TargetKind::Gateway => format!(
                "edgeroute gateway: `edgeroute node --config gateway.toml` on {} (pid {}), `worker_threads = {}`, JWT-authenticated, in front of the same sim",
                t.addr, t.pid, self.gateway_worker_threads
            ),
            TargetKind::Router => format!(
                "edgeroute router: `edgeroute router --config router.toml` on {} (pid {}), a thread per core, JWT-authenticated (the same HS256 secret: the tenant's token goes through to the node), limits out of the way (below), in front of the same gateway, which it finds through an `edgeroute discovery` process over that one node (static `[[nodes]]`, probes every 250 ms)",
                t.addr, t.pid
            ),
            TargetKind::Nginx => format!(
                "nginx: {} on {} (pid {}), `worker_processes {}`, upstream keepalive, `proxy_buffering off`, in front of the same sim",
                self.nginx_version.as_deref().unwrap_or("nginx"),
                t.addr,
                t.pid,
                self.nginx_workers
            ),
            TargetKind::LiteLlm => {
                let (version, workers) = match &self.litellm {
                    Some(l) => (l.version.as_deref().unwrap_or("version unknown"), l.workers),
                    None => ("version unknown", 1),
                };
                format!(
                    "LiteLLM proxy: litellm {version} (`litellm --config config.yaml --num_workers {workers}`, uvicorn) on {} (pid {}), master-key auth, no database, logging callbacks off, in front of the same sim as an `openai/` model",
                    t.addr, t.pid
                )
            }
        }
    }

    fn has_litellm(&self) -> bool {
        self.targets.iter().any(|t| t.kind == TargetKind::LiteLlm)
    }

    /// The report as Markdown, ready for BENCHMARKS.md.
    pub fn to_markdown(&self) -> String {
        let mut md = String::new();
        let m = &self.machine;
        let _ = writeln!(md, "# Gateway overhead on loopback\n");
        let _ = writeln!(
            md,
            "- **Machine**: {} cores (`nproc`), kernel `{}` (`uname -r`), CPU: {}.",
            m.nproc, m.kernel, m.cpu
        );
        let router = self.targets.iter().any(|t| t.kind == TargetKind::Router);
        let servers = match (router, self.has_litellm()) {
            (false, true) => "the simulator, the gateway, nginx and LiteLLM",
            (false, false) => "the simulator, the gateway and nginx",
            (true, true) => {
                "the simulator, the gateway, the router and its discovery replica, nginx and LiteLLM"
            }
            (true, false) => {
                "the simulator, the gateway, the router and its discovery replica, and nginx"
            }
        };
        let _ = writeln!(
            md,
            "- **Shared cores**: the load generator runs on the same {} cores as {servers}; every figure includes that contention.",
            m.nproc
        );
        if !self.command.is_empty() {
            let _ = writeln!(md, "- **Command**: `{}`", self.command);
        }
        let _ = writeln!(
            md,
            "- **Load**: open-loop at a constant rate; latency is measured from each request's intended send time, so a stall counts against every request scheduled during it (no coordinated omission). HTTP/1.1 keep-alive, {} connections per target. Per target and phase: {} measured in {} round(s), each after {} of warm-up (excluded); targets alternate and their order rotates each round. Request: model `{}`, `max_tokens` {}.",
            self.connections,
            fmt_secs(self.duration),
            self.rounds,
            fmt_secs(self.warmup),
            self.model,
            self.max_tokens
        );
        if self.phases.iter().any(|p| p.endpoint != Endpoint::Chat) {
            let _ = writeln!(
                md,
                "- **Endpoints beside chat** (issue 19), each asked of model `{}`, direct, through nginx and through the gateway (LiteLLM and the router are loaded with chat only); the simulator's transcription, speech and embedding delays are zero too (`--zero-latency`), so only proxy overhead remains:",
                self.model
            );
            for w in self.workloads.iter().filter(|w| w.endpoint != Endpoint::Chat) {
                let what = match w.endpoint {
                    Endpoint::Chat => continue,
                    Endpoint::Embeddings => "one input (the prompt), a JSON answer of".to_owned(),
                    Endpoint::Completions => format!("the prompt, `max_tokens` {}, a JSON answer of", self.max_tokens),
                    Endpoint::Transcriptions => format!("a multipart upload (`model` field, `file` part: a {UPLOAD_CLIP_S} s 16 kHz mono WAV clip), a JSON transcript of"),
                    Endpoint::Speech => "the prompt as `input`, `response_format` wav; timed to the first body byte (first audio) and to the last; the WAV is".to_owned(),
                };
                let _ = writeln!(
                    md,
                    "  - `{}`: {} bytes sent, {what} {} bytes.",
                    w.endpoint.path(),
                    fmt_rate(w.request_bytes as f64),
                    fmt_rate(w.answer_bytes as f64)
                );
            }
        }
        let _ = writeln!(
            md,
            "- **Late starts**: requests that found every connection busy and started more than {} after their intended time. Any late start or error marks the rate as not sustained.",
            fmt_us(u64::try_from(self.late_threshold.as_micros()).unwrap_or(u64::MAX))
        );
        if let Some(l) = &self.litellm {
            let _ = writeln!(
                md,
                "- **LiteLLM's rate cap**: LiteLLM is loaded only at rates up to {} requests/s (one Python worker; above that its figures would be queueing and its runs would last until the request timeout). At those rates all four targets get the same load; higher rates have no LiteLLM row. At {} requests/s each target gets {} measured requests per phase, so a p99 there rests on its slowest few requests; the p50s are the steadier comparison.",
                fmt_rate(l.max_rate),
                fmt_rate(l.max_rate),
                (l.max_rate * self.duration.as_secs_f64()).round(),
            );
        }
        let _ = writeln!(
            md,
            "- **Added**: a target's percentile minus the direct target's at the same percentile (a difference of percentiles, not a percentile of per-request differences). Ratio: target p99 ÷ direct p99."
        );
        let _ = writeln!(md, "- **Targets**:");
        for t in &self.targets {
            let _ = writeln!(md, "  - {}", self.target_line(t));
        }
        if let Some(l) = &self.litellm
            && !self.has_litellm()
        {
            let _ = writeln!(
                md,
                "  - LiteLLM proxy (litellm {}): not started, every rate is above its cap of {} requests/s",
                l.version.as_deref().unwrap_or("version unknown"),
                fmt_rate(l.max_rate)
            );
        }
        let _ = writeln!(md);
        self.summary(&mut md);
        self.router_summary(&mut md);
        self.endpoint_summary(&mut md);

        for phase in &self.phases {
            match (phase.endpoint, phase.mode) {
                (Endpoint::Chat, Mode::Stream) => {
                    let _ = writeln!(
                        md,
                        "## Streaming (SSE) answers at {} requests/s\n",
                        fmt_rate(phase.rate)
                    );
                    let _ = writeln!(md, "Time to first token:\n");
                    self.table(&mut md, phase, Metric::Ttft, true);
                    let _ = writeln!(md, "Time to `data: [DONE]`:\n");
                    self.table(&mut md, phase, Metric::Total, false);
                }
                (Endpoint::Chat, _) => {
                    let _ =
                        writeln!(md, "## JSON answers at {} requests/s\n", fmt_rate(phase.rate));
                    self.table(&mut md, phase, Metric::Total, true);
                }
                (endpoint, Mode::Bytes) => {
                    let _ = writeln!(
                        md,
                        "## `{}` (a streamed answer) at {} requests/s\n",
                        endpoint.path(),
                        fmt_rate(phase.rate)
                    );
                    let _ = writeln!(md, "Time to the first byte of the answer (first audio):\n");
                    self.table(&mut md, phase, Metric::Ttft, true);
                    let _ = writeln!(md, "Time to the last byte:\n");
                    self.table(&mut md, phase, Metric::Total, false);
                }
                (endpoint, _) => {
                    let _ = writeln!(
                        md,
                        "## `{}` at {} requests/s\n",
                        endpoint.path(),
                        fmt_rate(phase.rate)
                    );
                    self.table(&mut md, phase, Metric::Total, true);
                }
            }
            if self.has_litellm()
                && phase.endpoint == Endpoint::Chat
                && !phase.rows.iter().any(|r| r.target == TargetKind::LiteLlm)
            {
                let cap = self.litellm.as_ref().map_or(0.0, |l| l.max_rate);
                let _ = writeln!(
                    md,
                    "LiteLLM was not loaded at this rate (above its cap of {} requests/s).\n",
                    fmt_rate(cap)
                );
            }
            let delays: Vec<String> = phase
                .rows
                .iter()
                .map(|r| {
                    let p = Percentiles::of(&r.load.start_delay);
                    format!("{} {} / {}", r.target.label(), fmt_us(p.p50), fmt_us(p.p99))
                })
                .collect();
            let _ = writeln!(
                md,
                "Load generator start delay (intended → sent), p50 / p99: {}.\n",
                delays.join("; ")
            );
            let cpu: Vec<String> = phase
                .rows
                .iter()
                .filter_map(|r| {
                    let ns = r.cpu_per_request_ns?;
                    Some(format!("{} {:.1} µs", r.target.label(), ns as f64 / 1e3))
                })
                .collect();
            if !cpu.is_empty() {
                let _ = writeln!(
                    md,
                    "CPU per request (user + kernel, the process tree's threads from `/proc/PID/task/*/schedstat`, warm-up requests included; the direct target is the simulator alone, the others exclude it): {}.\n",
                    cpu.join("; ")
                );
            }
        }

        if !self.memory.is_empty() {
            let _ = writeln!(md, "## Memory over the whole run\n");
            let _ = writeln!(md, "| target | RSS after warm-up | RSS at the end | change |");
            let _ = writeln!(md, "|---|---:|---:|---:|");
            for r in &self.memory {
                let change = match (r.before, r.after) {
                    (Some(b), Some(a)) => {
                        let d = a as f64 - b as f64;
                        format!(
                            "{}{:.1} MiB",
                            if d < 0.0 { "−" } else { "+" },
                            d.abs() / (1024.0 * 1024.0)
                        )
                    }
                    _ => "?".into(),
                };
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} |",
                    r.target.label(),
                    fmt_mib(r.before),
                    fmt_mib(r.after),
                    change
                );
            }
            let _ = writeln!(
                md,
                "\nRSS of the process tree (nginx: master and workers; LiteLLM: the proxy and any worker processes), from `/proc/PID/status`.\n"
            );
        }

        let _ = writeln!(md, "## Configurations\n");
        let _ = writeln!(md, "Gateway (`gateway.toml`):\n\n```toml\n{}```\n", self.gateway_config);
        if let Some(r) = &self.router_configs {
            let _ = writeln!(md, "Router (`router.toml`):\n\n```toml\n{}```\n", r.router);
            let _ = writeln!(
                md,
                "Its discovery replica (`discovery.toml`):\n\n```toml\n{}```\n",
                r.discovery
            );
        }
        if let Some(conf) = &self.nginx_config {
            let _ = writeln!(md, "nginx:\n\n```nginx\n{conf}```\n");
        }
        if let Some(conf) = self.litellm.as_ref().and_then(|l| l.config.as_ref()) {
            let _ = writeln!(
                md,
                "LiteLLM (`config.yaml`; environment `LITELLM_MODE=PRODUCTION`, `LITELLM_LOG=ERROR`, `LITELLM_LOCAL_MODEL_COST_MAP=True`):\n\n```yaml\n{conf}```"
            );
        }
        md
    }

    /// One line per phase and latency: what each proxy adds over direct at p50 and p99, and
    /// LiteLLM's added latency as a multiple of the gateway's (p50: the steadier figure at
    /// low rates, where p99 rests on a few samples; p99: the one the goals are stated in).
    fn summary(&self, md: &mut String) {
        if self.phases.is_empty() {
            return;
        }
        if !self.phases.iter().any(|p| p.endpoint == Endpoint::Chat) {
            return;
        }
        let _ = writeln!(md, "## Summary: latency added over direct\n");
        let _ = writeln!(
            md,
            "| phase | gateway +p50 | gateway +p99 | nginx +p50 | nginx +p99 | LiteLLM +p50 | LiteLLM +p99 | LiteLLM ÷ gateway, added p50 | LiteLLM ÷ gateway, added p99 |"
        );
        let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        for phase in self.phases.iter().filter(|p| p.endpoint == Endpoint::Chat) {
            for &(metric, what) in Metric::summarized(phase.mode) {
                let Some(d) = phase.find(TargetKind::Direct) else { continue };
                let base = metric.of(&d.load);
                let added = |k: TargetKind| {
                    phase.find(k).map(|r| {
                        let p = metric.of(&r.load);
                        let mark = if r.load.sustained() { "" } else { " (not sustained)" };
                        (
                            i128::from(p.p50) - i128::from(base.p50),
                            i128::from(p.p99) - i128::from(base.p99),
                            mark,
                        )
                    })
                };
                let cells = |a: Option<(i128, i128, &str)>| match a {
                    Some((a50, a99, mark)) => {
                        format!("{} | {}{mark}", fmt_delta(a50), fmt_delta(a99))
                    }
                    None => "— | —".to_owned(),
                };
                let gw = added(TargetKind::Gateway);
                let lite = added(TargetKind::LiteLlm);
                let (ratio50, ratio99) = match (lite, gw) {
                    (Some((l50, l99, _)), Some((g50, g99, _))) => {
                        (fmt_ratio(l50, g50), fmt_ratio(l99, g99))
                    }
                    _ => ("—".to_owned(), "—".to_owned()),
                };
                let _ = writeln!(
                    md,
                    "| {what}, {} req/s | {} | {} | {} | {ratio50} | {ratio99} |",
                    fmt_rate(phase.rate),
                    cells(gw),
                    cells(added(TargetKind::Nginx)),
                    cells(lite),
                );
            }
        }
        let _ = writeln!(md);
        let direct_sustained = self
            .phases
            .iter()
            .all(|p| p.find(TargetKind::Direct).is_none_or(|d| d.load.sustained()));
        if !direct_sustained {
            let _ = writeln!(
                md,
                "Rates the direct target itself did not sustain measure queueing more than proxy overhead (see the tables below).\n"
            );
        }
    }

    /// With a router row: what the router adds over the node it forwards to (router minus
    /// gateway, p50 and p99), beside what LiteLLM adds over direct in the same phase.
    fn router_summary(&self, md: &mut String) {
        if !self.targets.iter().any(|t| t.kind == TargetKind::Router) {
            return;
        }
        let _ = writeln!(md, "## Summary: the router's added latency\n");
        let _ = writeln!(
            md,
            "Router added = the router row minus the gateway row (the router forwards to that same gateway); gateway and LiteLLM added = minus the direct row. Same percentile, same phase.\n"
        );
        let _ = writeln!(
            md,
            "| phase | router added p50 | router added p99 | router over direct p50 / p99 | gateway added p50 / p99 | LiteLLM added p50 / p99 | LiteLLM added ÷ router added, p50 / p99 |"
        );
        let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|");
        for phase in self.phases.iter().filter(|p| p.endpoint == Endpoint::Chat) {
            for &(metric, what) in Metric::summarized(phase.mode) {
                let pct =
                    |k: TargetKind| phase.find(k).map(|r| (metric.of(&r.load), r.load.sustained()));
                let (Some((router, r_ok)), Some((gw, g_ok))) =
                    (pct(TargetKind::Router), pct(TargetKind::Gateway))
                else {
                    continue;
                };
                let over = |a: Percentiles, b: Percentiles| {
                    (i128::from(a.p50) - i128::from(b.p50), i128::from(a.p99) - i128::from(b.p99))
                };
                let mark = if r_ok && g_ok { "" } else { " (not sustained)" };
                let (r50, r99) = over(router, gw);
                let direct = pct(TargetKind::Direct).map(|(d, _)| d);
                let pair = |x: Option<(i128, i128)>| match x {
                    Some((a, b)) => format!("{} / {}", fmt_delta(a), fmt_delta(b)),
                    None => "—".into(),
                };
                let lite = direct.zip(pct(TargetKind::LiteLlm)).map(|(d, (l, _))| over(l, d));
                let ratio = match lite {
                    Some((l50, l99)) => {
                        format!("{} / {}", fmt_ratio(l50, r50), fmt_ratio(l99, r99))
                    }
                    None => "—".into(),
                };
                let _ = writeln!(
                    md,
                    "| {what}, {} req/s | {}{mark} | {}{mark} | {} | {} | {} | {ratio} |",
                    fmt_rate(phase.rate),
                    fmt_delta(r50),
                    fmt_delta(r99),
                    pair(direct.map(|d| over(router, d))),
                    pair(direct.map(|d| over(gw, d))),
                    pair(lite),
                );
            }
        }
        let _ = writeln!(md);
    }

    /// The endpoints beside chat: each target's p50 and p99, and what the gateway and nginx
    /// add over direct at p99, side by side.
    fn endpoint_summary(&self, md: &mut String) {
        let phases: Vec<&Phase> =
            self.phases.iter().filter(|p| p.endpoint != Endpoint::Chat).collect();
        if phases.is_empty() {
            return;
        }
        let _ = writeln!(md, "## Summary: the endpoints beside chat (issue 19)\n");
        let _ = writeln!(
            md,
            "Added = the target's percentile minus direct's. Gateway − nginx: the gateway's added p99 minus nginx's (negative: the gateway added less).\n"
        );
        let _ = writeln!(
            md,
            "| endpoint, rate | direct p50 / p99 | nginx p50 / p99 | gateway p50 / p99 | nginx added p99 | gateway added p99 | gateway − nginx, added p99 |"
        );
        let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|");
        for phase in phases {
            let Some(direct) = phase.find(TargetKind::Direct) else { continue };
            for &(metric, what) in Metric::of_endpoint(phase.endpoint) {
                let base = metric.of(&direct.load);
                let cell = |k: TargetKind| -> (String, Option<i128>) {
                    match phase.find(k) {
                        Some(r) => {
                            let p = metric.of(&r.load);
                            let mark = if r.load.sustained() { "" } else { " (not sustained)" };
                            (
                                format!("{} / {}{mark}", fmt_us(p.p50), fmt_us(p.p99)),
                                Some(i128::from(p.p99) - i128::from(base.p99)),
                            )
                        }
                        None => ("—".into(), None),
                    }
                };
                let (d, _) = cell(TargetKind::Direct);
                let (ng, ng_added) = cell(TargetKind::Nginx);
                let (gw, gw_added) = cell(TargetKind::Gateway);
                let added = |a: Option<i128>| a.map_or("—".to_owned(), fmt_delta);
                let gap = match (gw_added, ng_added) {
                    (Some(g), Some(n)) => fmt_delta(g - n),
                    _ => "—".into(),
                };
                let _ = writeln!(
                    md,
                    "| {what}, {} req/s | {d} | {ng} | {gw} | {} | {} | {gap} |",
                    fmt_rate(phase.rate),
                    added(ng_added),
                    added(gw_added),
                );
            }
        }
        let _ = writeln!(md);
    }

    fn table(&self, md: &mut String, phase: &Phase, metric: Metric, full: bool) {
        let direct = phase.rows.iter().find(|r| r.target == TargetKind::Direct);
        let base = direct.map(|d| metric.of(&d.load));
        if full {
            let _ = writeln!(
                md,
                "| target | achieved req/s | p50 | p99 | p99.9 | max | added p50 | added p99 | p99 ÷ direct | CPU / request | errors | late starts | RSS start → end |"
            );
            let _ =
                writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        } else {
            let _ = writeln!(
                md,
                "| target | p50 | p99 | p99.9 | max | added p50 | added p99 | p99 ÷ direct |"
            );
            let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|");
        }
        for row in &phase.rows {
            let p = metric.of(&row.load);
            let (added50, added99, ratio) = match (row.target, base) {
                (TargetKind::Direct, _) | (_, None) => ("—".into(), "—".into(), "—".into()),
                (_, Some(b)) => (
                    fmt_delta(i128::from(p.p50) - i128::from(b.p50)),
                    fmt_delta(i128::from(p.p99) - i128::from(b.p99)),
                    if b.p99 > 0 {
                        format!("{:.2}×", p.p99 as f64 / b.p99 as f64)
                    } else {
                        "—".into()
                    },
                ),
            };
            let latencies = if p.count == 0 {
                "no samples | — | — | —".to_owned()
            } else {
                format!(
                    "{} | {} | {} | {}",
                    fmt_us(p.p50),
                    fmt_us(p.p99),
                    fmt_us(p.p999),
                    fmt_us(p.max)
                )
            };
            if full {
                let load = &row.load;
                let achieved = if load.sustained() {
                    format!("{:.0}", load.achieved_rate())
                } else {
                    format!("{:.0} **not sustained**", load.achieved_rate())
                };
                let errors = match load.errors.total() {
                    0 => "0".to_owned(),
                    n => format!("{n} ({})", load.errors.breakdown()),
                };
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} of {} | {} → {} |",
                    row.target.label(),
                    achieved,
                    latencies,
                    added50,
                    added99,
                    ratio,
                    row.cpu_per_request_ns.map_or("—".into(), |ns| fmt_us(ns / 1000)),
                    errors,
                    load.late_starts,
                    load.scheduled,
                    fmt_mib(row.rss_start),
                    fmt_mib(row.rss_end),
                );
            } else {
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} |",
                    row.target.label(),
                    latencies,
                    added50,
                    added99,
                    ratio
                );
            }
        }
        let _ = writeln!(md);
        if let (Some(gw), Some(ng)) =
            (phase.find(TargetKind::Gateway), phase.find(TargetKind::Nginx))
            && let Some(diffs) = round_differences(gw, ng, metric)
        {
            let _ = writeln!(md, "{}\n", round_sentence(&diffs));
        }
        if full {
            if let Some(steal) = phase.steal.filter(|&s| s >= 0.005) {
                let _ = writeln!(
                    md,
                    "The hypervisor took {:.1} % of this machine's CPU time during this phase (steal, `/proc/stat`): its stalls fall on every target alike and set the tails; compare p99s from runs where it is near 0.\n",
                    steal * 100.0
                );
            }
            self.verdict(md, phase, metric);
        }
    }

    /// The targets the benchmark is published against, stated per table.
    fn verdict(&self, md: &mut String, phase: &Phase, metric: Metric) {
        let find = |k: TargetKind| phase.rows.iter().find(|r| r.target == k);
        let Some(direct) = find(TargetKind::Direct) else { return };
        let unsustained: Vec<&str> =
            phase.rows.iter().filter(|r| !r.load.sustained()).map(|r| r.target.label()).collect();
        if !unsustained.is_empty() {
            let _ = writeln!(
                md,
                "Not sustained at this rate: {} (late starts or errors above); their latencies include queueing behind a saturated pool.",
                unsustained.join(", ")
            );
        }
        if !direct.load.sustained() {
            let _ = writeln!(
                md,
                "The direct target itself did not sustain this rate, so the added figures mostly measure queueing, not proxy overhead.\n"
            );
            return;
        }
        let b = metric.of(&direct.load).p99;
        let added =
            |k: TargetKind| find(k).map(|r| i128::from(metric.of(&r.load).p99) - i128::from(b));
        let mut parts = Vec::new();
        if let Some(gw) = added(TargetKind::Gateway) {
            parts.push(format!(
                "gateway added p99 {} (goal < 1 ms: {})",
                fmt_delta(gw),
                if gw < 1000 { "met" } else { "missed" }
            ));
            if let Some(ng) = added(TargetKind::Nginx) {
                // From six rounds on the goal is judged by the round-by-round median's interval
                // (the sentence above it): a whole-phase p99 is decided by its worst slices.
                let rounds = find(TargetKind::Gateway)
                    .zip(find(TargetKind::Nginx))
                    .and_then(|(g, n)| round_differences(g, n, metric))
                    .and_then(|mut d| {
                        d.sort_unstable();
                        median_interval(&d)
                    });
                let goal = match rounds {
                    Some((_, hi, _)) if hi <= 0 => {
                        "met: the round-by-round median's interval is at or below zero"
                    }
                    Some((lo, _, _)) if lo > 0 => {
                        "missed: the round-by-round median's interval is above zero"
                    }
                    Some(_) => "not told apart: the round-by-round median's interval spans zero",
                    None if gw <= ng => "met",
                    None => "missed",
                };
                parts.push(format!(
                    "nginx added p99 {} (goal gateway ≤ nginx: {goal}; whole-phase gateway − nginx {})",
                    fmt_delta(ng),
                    fmt_delta(gw - ng)
                ));
            }
            if let Some(lite) = added(TargetKind::LiteLlm) {
                parts.push(format!(
                    "LiteLLM added p99 {} (LiteLLM added p99 ÷ gateway added p99: {})",
                    fmt_delta(lite),
                    fmt_ratio(lite, gw)
                ));
            }
        }
        if !parts.is_empty() {
            let _ = writeln!(md, "{}.\n", capitalize(&parts.join("; ")));
        }
    }
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_medians_interval_is_the_order_statistics_binomial_coverage_allows() {
        let xs = |n: i128| (1..=n).collect::<Vec<i128>>();
        assert_eq!(median_interval(&xs(5)), None);
        // n = 6: only the extremes, 1 − 2/64.
        let (lo, hi, c) = median_interval(&xs(6)).unwrap();
        assert_eq!((lo, hi), (1, 6));
        assert!((c - (1.0 - 2.0 / 64.0)).abs() < 1e-12, "{c}");
        // n = 12: x₍₃₎ and x₍₁₀₎, 1 − 2·79/4096; x₍₄₎ would cover only 85.4 %.
        let (lo, hi, c) = median_interval(&xs(12)).unwrap();
        assert_eq!((lo, hi), (3, 10));
        assert!((c - (1.0 - 2.0 * 79.0 / 4096.0)).abs() < 1e-12, "{c}");
        // n = 20: x₍₆₎ and x₍₁₅₎ (the textbook pair), 95.9 %.
        let (lo, hi, c) = median_interval(&xs(20)).unwrap();
        assert_eq!((lo, hi), (6, 15));
        assert!((c - 0.9586).abs() < 1e-4, "{c}");
    }

    #[test]
    fn the_round_sentence_says_what_its_interval_tells() {
        let below = round_sentence(&[-30, -10, -20, -5, -40, -1]);
        assert!(below.contains("interval (order statistics, 96.9 % confidence) −40 µs to −1 µs: the gateway is at or below nginx."), "{below}");
        let above = round_sentence(&[30, 10, 20, 5, 40, 1]);
        assert!(above.ends_with("the gateway is above nginx."), "{above}");
        let mixed = round_sentence(&[30, -10, 20, 5, 40, 1]);
        assert!(mixed.ends_with("not told apart at this many rounds."), "{mixed}");
    }

    #[test]
    fn gateway_config_is_valid_toml_with_the_expected_keys() {
        let text = gateway_config_toml(
            "127.0.0.1:4100".parse().unwrap(),
            "http://127.0.0.1:4200",
            Path::new("/tmp/x \"y\"/secret"),
            1,
        )
        .unwrap();
        let parsed = edgeroute_node::NodeConfig::parse(&text, |_| None).unwrap();
        assert_eq!(parsed.limits.max_concurrency, 100_000);
        let v: toml::Value = toml::from_str(&text).unwrap();
        assert_eq!(v["node"]["listen"].as_str(), Some("127.0.0.1:4100"));
        assert_eq!(v["node"]["id"].as_str(), Some("bench-gw"));
        assert_eq!(v["backend"]["kind"].as_str(), Some("openai"));
        assert_eq!(v["backend"]["url"].as_str(), Some("http://127.0.0.1:4200"));
        assert_eq!(v["backend"]["models"][0]["id"].as_str(), Some("sim-llama"));
        assert_eq!(v["auth"]["hs256_secret_file"].as_str(), Some("/tmp/x \"y\"/secret"));
        assert_eq!(v["limits"]["rate_limit_per_s"].as_integer(), Some(1_000_000));
        assert_eq!(v["limits"]["rate_limit_burst"].as_integer(), Some(1_000_000));
    }

    #[test]
    fn nginx_conf_proxies_with_keepalive_and_no_buffering() {
        let conf = nginx_conf(
            "127.0.0.1:4300".parse().unwrap(),
            "127.0.0.1:4200".parse().unwrap(),
            Path::new("/tmp/bench/nginx"),
            1,
        );
        for needle in [
            "worker_processes 1;",
            "daemon off;",
            "pid /tmp/bench/nginx/nginx.pid;",
            "error_log /tmp/bench/nginx/error.log",
            "access_log off;",
            "server 127.0.0.1:4200;",
            "keepalive 256;",
            "listen 127.0.0.1:4300;",
            "proxy_http_version 1.1;",
            "proxy_set_header Connection \"\";",
            "proxy_buffering off;",
            "proxy_temp_path /tmp/bench/nginx/proxy;",
        ] {
            assert!(conf.contains(needle), "missing {needle:?} in\n{conf}");
        }
        // Every absolute path nginx writes stays inside the prefix.
        let paths = conf
            .split_whitespace()
            .filter(|w| w.starts_with('/') && w.len() > 1)
            .collect::<Vec<_>>();
        assert_eq!(paths.len(), 7, "{paths:?}");
        for p in paths {
            assert!(p.starts_with("/tmp/bench/nginx/"), "path outside the prefix: {p}");
        }
        // Braces balance, or nginx refuses the file.
        assert_eq!(conf.matches('{').count(), conf.matches('}').count());
    }

    /// nginx accepts the generated file (`nginx -t`), when nginx is installed.
    #[test]
    fn nginx_accepts_the_generated_conf() {
        let nginx = Path::new("/usr/sbin/nginx");
        if !nginx.exists() {
            eprintln!("skipped: {} not installed", nginx.display());
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let conf = nginx_conf(
            "127.0.0.1:4300".parse().unwrap(),
            "127.0.0.1:4200".parse().unwrap(),
            dir.path(),
            1,
        );
        let path = dir.path().join("nginx.conf");
        std::fs::write(&path, conf).unwrap();
        let out = Command::new(nginx)
            .arg("-t")
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&path)
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }

    #[test]
    fn litellm_config_routes_the_model_to_the_sim_behind_the_master_key() {
        let conf = litellm_config_yaml("127.0.0.1:4200".parse().unwrap(), "sim-llama", "sk-abc");
        for needle in [
            "model_list:\n  - model_name: \"sim-llama\"\n    litellm_params:\n",
            "      model: \"openai/sim-llama\"\n",
            "      api_base: \"http://127.0.0.1:4200/v1\"\n",
            "      api_key: \"sk-bench-unused\"\n",
            "general_settings:\n  master_key: \"sk-abc\"\n",
            "  disable_spend_logs: true\n",
            "  disable_error_logs: true\n",
            "  background_health_checks: false\n",
            "  set_verbose: false\n",
            "  callbacks: []\n",
            "  success_callback: []\n",
            "  failure_callback: []\n",
        ] {
            assert!(conf.contains(needle), "missing {needle:?} in\n{conf}");
        }
        // No database: without one LiteLLM checks only the master key and writes no logs.
        assert!(!conf.contains("database_url"), "{conf}");
        // YAML forbids tabs in indentation; every top-level key starts a known section.
        assert!(!conf.contains('\t'));
        let top: Vec<&str> = conf
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with(' ') && !l.starts_with('#'))
            .collect();
        assert_eq!(top, ["model_list:", "litellm_settings:", "general_settings:"]);
        // Values are quoted, so a model name with YAML syntax in it stays one string.
        let odd = litellm_config_yaml("127.0.0.1:1".parse().unwrap(), "a: \"b\"", "sk-x");
        assert!(odd.contains(r#"model_name: "a: \"b\"""#), "{odd}");
        assert!(odd.contains(r#"model: "openai/a: \"b\"""#), "{odd}");
    }

    #[test]
    fn litellm_master_keys_have_the_required_prefix_and_differ() {
        let a = litellm_master_key().unwrap();
        let b = litellm_master_key().unwrap();
        assert!(a.starts_with("sk-") && a.len() > 64, "{a}");
        assert_ne!(a, b);
    }

    #[test]
    fn litellm_version_comes_from_the_venv_dist_info() {
        let venv = tempfile::tempdir().unwrap();
        let bin = venv.path().join("bin/litellm");
        std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
        std::fs::write(&bin, "#!/bin/sh\nexit 1\n").unwrap();
        let site = venv.path().join("lib/python3.11/site-packages");
        std::fs::create_dir_all(site.join("litellm_proxy_extras-0.4.1.dist-info")).unwrap();
        std::fs::create_dir_all(site.join("litellm-1.106.0.dist-info")).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        assert_eq!(rt.block_on(litellm_version(&bin)).as_deref(), Some("1.106.0"));
    }

    fn load(mode: Mode, rate: f64, base_us: u64, ttft: bool) -> LoadReport {
        let spec = LoadSpec::new("http://127.0.0.1:1", Bytes::new(), mode, rate);
        let mut r = LoadReport::empty_for_test(&spec).unwrap();
        for i in 0..1000 {
            // 1% of samples are 10x slower, so p99.9 sits in the tail.
            let v = if i % 100 == 99 { base_us * 10 } else { base_us };
            r.record_for_test(v, ttft.then_some(v / 2));
        }
        r.active = Duration::from_secs(1);
        r
    }

    fn report(phases: Vec<Phase>) -> GatewayBenchReport {
        let t = |kind, port, pid| TargetInfo {
            kind,
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            pid,
        };
        GatewayBenchReport {
            machine: MachineInfo { nproc: 2, kernel: "6.1.0-test".into(), cpu: "Test CPU".into() },
            command: "edgeroute bench gateway".into(),
            nginx_version: Some("nginx/1.22.1".into()),
            nginx_workers: 1,
            litellm: None,
            gateway_worker_threads: 1,
            connections: 32,
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(2),
            rounds: 2,
            model: "sim-llama".into(),
            max_tokens: 16,
            late_threshold: Duration::from_millis(1),
            targets: vec![
                t(TargetKind::Direct, 4200, 11),
                t(TargetKind::Gateway, 4100, 12),
                t(TargetKind::Nginx, 4300, 13),
            ],
            phases,
            workloads: vec![],
            memory: vec![MemoryRow {
                target: TargetKind::Gateway,
                before: Some(10 * 1024 * 1024),
                after: Some(11 * 1024 * 1024),
            }],
            gateway_config: "[node]\n".into(),
            nginx_config: Some("worker_processes 1;\n".into()),
            router_configs: None,
        }
    }

    fn row(target: TargetKind, load: LoadReport) -> Row {
        Row {
            target,
            load,
            rss_start: Some(8 << 20),
            rss_end: Some(9 << 20),
            cpu_per_request_ns: Some(61_000),
            rounds: Vec::new(),
        }
    }

    #[test]
    fn markdown_states_machine_command_and_overheads() {
        let phase = Phase {
            endpoint: Endpoint::Chat,
            mode: Mode::Json,
            rate: 1000.0,
            steal: None,
            rows: vec![
                row(TargetKind::Direct, load(Mode::Json, 1000.0, 100, false)),
                row(TargetKind::Gateway, load(Mode::Json, 1000.0, 180, false)),
                row(TargetKind::Nginx, load(Mode::Json, 1000.0, 200, false)),
            ],
        };
        let mut stolen = phase.clone();
        let md = report(vec![phase]).to_markdown();
        assert!(!md.contains("The hypervisor took"), "no steal measured, none stated");
        stolen.steal = Some(0.093);
        let stolen_md = report(vec![stolen]).to_markdown();
        assert!(stolen_md.contains("The hypervisor took 9.3 % of this machine's CPU time"));
        assert!(md.contains("2 cores (`nproc`), kernel `6.1.0-test` (`uname -r`)"), "{md}");
        assert!(md.contains("load generator runs on the same 2 cores"));
        assert!(md.contains("`edgeroute bench gateway`"));
        assert!(md.contains("## JSON answers at 1,000 requests/s"));
        assert!(md.contains("`worker_processes 1`"));
        // Gateway: p50 180 vs 100 → +80 µs; p99 is 180 vs 100 too (1% tail is above p99).
        let gw = md.lines().find(|l| l.starts_with("| edgeroute gateway")).unwrap();
        assert!(gw.contains("| +80 µs |"), "{gw}");
        assert!(gw.contains("| 1.80× |"), "{gw}");
        assert!(gw.contains("| 0 of 1000 | 8.0 MiB → 9.0 MiB |"), "{gw}");
        let direct = md.lines().find(|l| l.starts_with("| direct (sim)")).unwrap();
        assert!(direct.contains("| — | — | — |"), "{direct}");
        assert!(md.contains("Gateway added p99 +80 µs (goal < 1 ms: met)"), "{md}");
        assert!(
            md.contains(
                "nginx added p99 +100 µs (goal gateway ≤ nginx: met; whole-phase gateway − nginx −20 µs)"
            ),
            "{md}"
        );
        assert!(md.contains("| edgeroute gateway | 10.0 MiB | 11.0 MiB | +1.0 MiB |"), "{md}");
    }

    #[test]
    fn markdown_gives_the_gateway_against_nginx_round_by_round() {
        let rounds = |p99s: &[u64]| -> Vec<RoundP99> {
            p99s.iter().map(|&total| RoundP99 { total, ttft: Some(total / 2) }).collect()
        };
        let with = |mut r: Row, p99s: &[u64]| {
            r.rounds = rounds(p99s);
            r
        };
        let phase = Phase {
            endpoint: Endpoint::Chat,
            mode: Mode::Stream,
            rate: 1000.0,
            steal: None,
            rows: vec![
                with(row(TargetKind::Direct, load(Mode::Stream, 1000.0, 100, false)), &[1, 1, 1]),
                with(
                    row(TargetKind::Gateway, load(Mode::Stream, 1000.0, 180, false)),
                    &[300, 900, 410],
                ),
                with(
                    row(TargetKind::Nginx, load(Mode::Stream, 1000.0, 200, false)),
                    &[320, 400, 400],
                ),
            ],
        };
        let md = report(vec![phase]).to_markdown();
        // Whole answers: 300−320, 900−400, 410−400; the median is the middle one.
        assert!(
            md.contains("gateway − nginx: −20 µs, +500 µs, +10 µs; the gateway at or below nginx in 1 of 3 rounds, median +10 µs."),
            "{md}"
        );
        // Three rounds give no interval.
        assert!(!md.contains("interval"), "{md}");
        // First frames: half of each (150−160, 450−200, 205−200).
        assert!(md.contains("gateway − nginx: −10 µs, +250 µs, +5 µs;"), "{md}");
        // One round says nothing round by round.
        let mut one = report(vec![]);
        one.phases = vec![Phase {
            endpoint: Endpoint::Chat,
            mode: Mode::Json,
            rate: 1000.0,
            steal: None,
            rows: vec![
                with(row(TargetKind::Direct, load(Mode::Json, 1000.0, 100, false)), &[1]),
                with(row(TargetKind::Gateway, load(Mode::Json, 1000.0, 180, false)), &[300]),
                with(row(TargetKind::Nginx, load(Mode::Json, 1000.0, 200, false)), &[320]),
            ],
        }];
        assert!(!one.to_markdown().contains("Round by round"));
    }

    /// From six rounds on, the goal's verdict follows the round-by-round median's interval,
    /// not the whole-phase p99 (which one stalled slice decides).
    #[test]
    fn the_nginx_goal_follows_the_round_interval_from_six_rounds() {
        let phase_with = |gateway: &[u64], nginx: &[u64], gw_us: u64| {
            let with = |mut r: Row, p99s: &[u64]| {
                r.rounds = p99s.iter().map(|&total| RoundP99 { total, ttft: None }).collect();
                r
            };
            let direct = vec![1; gateway.len()];
            Phase {
                endpoint: Endpoint::Chat,
                mode: Mode::Json,
                rate: 1000.0,
                steal: None,
                rows: vec![
                    with(row(TargetKind::Direct, load(Mode::Json, 1000.0, 100, false)), &direct),
                    with(row(TargetKind::Gateway, load(Mode::Json, 1000.0, gw_us, false)), gateway),
                    with(row(TargetKind::Nginx, load(Mode::Json, 1000.0, 200, false)), nginx),
                ],
            }
        };
        let md = |p: Phase| report(vec![p]).to_markdown();
        // Whole phase: the gateway above nginx (+100 µs), rounds spanning zero.
        let spans = md(phase_with(&[90, 110, 95, 105, 100, 120], &[100; 6], 300));
        assert!(
            spans.contains("(goal gateway ≤ nginx: not told apart: the round-by-round median's interval spans zero; whole-phase gateway − nginx +100 µs)"),
            "{spans}"
        );
        // Every round above: missed, whatever the whole phase says (here −20 µs).
        let above = md(phase_with(&[150, 160, 170, 155, 165, 175], &[100; 6], 180));
        assert!(
            above.contains("(goal gateway ≤ nginx: missed: the round-by-round median's interval is above zero; whole-phase gateway − nginx −20 µs)"),
            "{above}"
        );
        // Every round at or below: met.
        let below = md(phase_with(&[90, 80, 100, 70, 95, 85], &[100; 6], 300));
        assert!(
            below.contains("(goal gateway ≤ nginx: met: the round-by-round median's interval is at or below zero;"),
            "{below}"
        );
    }

    #[test]
    fn markdown_marks_rates_that_were_not_sustained() {
        let mut slow = load(Mode::Stream, 5000.0, 3000, true);
        slow.late_starts = 7;
        slow.errors.timeout = 2;
        let phase = Phase {
            endpoint: Endpoint::Chat,
            mode: Mode::Stream,
            rate: 5000.0,
            steal: None,
            rows: vec![
                row(TargetKind::Direct, load(Mode::Stream, 5000.0, 100, true)),
                row(TargetKind::Gateway, slow),
            ],
        };
        let md = report(vec![phase]).to_markdown();
        assert!(md.contains("## Streaming (SSE) answers at 5,000 requests/s"));
        assert!(md.contains("Time to first token:"));
        assert!(md.contains("Time to `data: [DONE]`:"));
        let gw = md
            .lines()
            .find(|l| l.starts_with("| edgeroute gateway") && l.contains("not sustained"));
        let gw = gw.expect("gateway row marked as not sustained");
        assert!(gw.contains("| 2 (timeout×2) | 7 of 1000 |"), "{gw}");
        assert!(md.contains("Not sustained at this rate: edgeroute gateway"));
        // TTFT table: 1.50 ms vs 50 µs at p50.
        assert!(gw.contains("| 1.50 ms |"), "{gw}");
        assert!(md.contains("goal < 1 ms: missed"), "{md}");
    }

    #[test]
    fn markdown_compares_litellm_with_the_gateway() {
        let mut r = report(vec![
            Phase {
                endpoint: Endpoint::Chat,
                mode: Mode::Json,
                rate: 50.0,
                steal: None,
                rows: vec![
                    row(TargetKind::Direct, load(Mode::Json, 50.0, 100, false)),
                    row(TargetKind::Gateway, load(Mode::Json, 50.0, 300, false)),
                    row(TargetKind::Nginx, load(Mode::Json, 50.0, 200, false)),
                    row(TargetKind::LiteLlm, load(Mode::Json, 50.0, 10_100, false)),
                ],
            },
            Phase {
                endpoint: Endpoint::Chat,
                mode: Mode::Json,
                rate: 1000.0,
                steal: None,
                rows: vec![
                    row(TargetKind::Direct, load(Mode::Json, 1000.0, 100, false)),
                    row(TargetKind::Gateway, load(Mode::Json, 1000.0, 300, false)),
                ],
            },
        ]);
        r.targets.push(TargetInfo {
            kind: TargetKind::LiteLlm,
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 4400)),
            pid: 14,
        });
        r.litellm = Some(LiteLlmInfo {
            version: Some("1.106.0".into()),
            workers: 1,
            max_rate: 50.0,
            config: Some("model_list:\n".into()),
        });
        let md = r.to_markdown();
        assert!(
            md.contains(
                "LiteLLM proxy: litellm 1.106.0 (`litellm --config config.yaml --num_workers 1`"
            ),
            "{md}"
        );
        assert!(md.contains("LiteLLM is loaded only at rates up to 50 requests/s"), "{md}");
        assert!(md.contains("the simulator, the gateway, nginx and LiteLLM"), "{md}");
        // +10 ms vs +200 µs at p99: 50×.
        assert!(
            md.contains("LiteLLM added p99 +10.00 ms (LiteLLM added p99 ÷ gateway added p99: 50×)"),
            "{md}"
        );
        let summary = md.lines().find(|l| l.starts_with("| JSON, 50 req/s |")).unwrap();
        assert_eq!(
            summary,
            "| JSON, 50 req/s | +200 µs | +200 µs | +100 µs | +100 µs | +10.00 ms | +10.00 ms | 50× | 50× |"
        );
        let summary = md.lines().find(|l| l.starts_with("| JSON, 1,000 req/s |")).unwrap();
        assert!(summary.ends_with("| — | — | — | — | — | — |"), "{summary}");
        assert!(
            md.contains("LiteLLM was not loaded at this rate (above its cap of 50 requests/s).")
        );
        let row = md.lines().find(|l| l.starts_with("| LiteLLM proxy |")).unwrap();
        assert!(row.contains("| +10.00 ms | +10.00 ms | 101."), "{row}");
        assert!(md.contains("```yaml\nmodel_list:\n```"), "{md}");
        assert_eq!(fmt_ratio(5, 0), "—");
        assert_eq!(fmt_ratio(15, 10), "1.5×");
    }

    #[test]
    fn markdown_says_when_litellm_was_not_started() {
        let mut r = report(vec![]);
        r.litellm = Some(LiteLlmInfo { version: None, workers: 1, max_rate: 50.0, config: None });
        let md = r.to_markdown();
        assert!(
            md.contains("LiteLLM proxy (litellm version unknown): not started, every rate is above its cap of 50 requests/s"),
            "{md}"
        );
    }

    #[test]
    fn router_config_has_auth_limits_and_an_optional_jobs_section() {
        let limits = RouterLimits::OUT_OF_THE_WAY;
        let text = router_config_toml(
            "127.0.0.1:4500".parse().unwrap(),
            "http://127.0.0.1:4600",
            Path::new("/tmp/x \"y\"/secret"),
            limits,
            None,
        );
        let v: toml::Value = toml::from_str(&text).unwrap();
        assert_eq!(v["router"]["listen"].as_str(), Some("127.0.0.1:4500"));
        assert_eq!(v["router"]["discovery"][0].as_str(), Some("http://127.0.0.1:4600"));
        assert_eq!(v["auth"]["hs256_secret_file"].as_str(), Some("/tmp/x \"y\"/secret"));
        let l = &v["limits"];
        assert_eq!(l["rate_limit_per_s"].as_integer(), Some(1_000_000));
        assert_eq!(l["rate_limit_burst"].as_integer(), Some(1_000_000));
        assert_eq!(l["total_in_flight"].as_integer(), Some(100_000));
        assert_eq!(l["tenant_in_flight"].as_integer(), Some(100_000));
        assert_eq!(l["tenant_queue"].as_integer(), Some(100_000));
        assert!(v.get("jobs").is_none());
        let with_jobs = router_config_toml(
            "127.0.0.1:4500".parse().unwrap(),
            "http://127.0.0.1:4600",
            Path::new("/s"),
            limits,
            Some("store = \"sqlite:/tmp/j.db\"\nworkers = 32"),
        );
        let v: toml::Value = toml::from_str(&with_jobs).unwrap();
        assert_eq!(v["jobs"]["store"].as_str(), Some("sqlite:/tmp/j.db"));
        assert_eq!(v["jobs"]["workers"].as_integer(), Some(32));
        assert!(with_jobs.ends_with('\n'));
    }

    #[test]
    fn the_static_discovery_replica_lists_the_gateway_and_checks_tokens() {
        let fleet = gateway_fleet("http://127.0.0.1:4200", Path::new("/tmp/secret"));
        let text = static_discovery_toml(
            &fleet,
            "127.0.0.1:4600".parse().unwrap(),
            &["http://127.0.0.1:4100".to_owned()],
        )
        .unwrap();
        let cfg = edgeroute_discovery::DiscoveryConfig::from_toml(&text, |_| None).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.discovery.listen, "127.0.0.1:4600".parse().unwrap());
        assert_eq!(cfg.nodes.len(), 1);
        assert_eq!(
            (cfg.nodes[0].id.as_str(), cfg.nodes[0].url.as_str()),
            ("bench-gw", "http://127.0.0.1:4100")
        );
        assert!(cfg.auth.is_some() && !cfg.discovery.allow_unauthenticated);
    }

    #[test]
    fn markdown_states_the_router_added_over_the_gateway_beside_litellm() {
        let mut r = report(vec![Phase {
            endpoint: Endpoint::Chat,
            mode: Mode::Json,
            rate: 20.0,
            steal: None,
            rows: vec![
                row(TargetKind::Direct, load(Mode::Json, 20.0, 100, false)),
                row(TargetKind::Gateway, load(Mode::Json, 20.0, 300, false)),
                row(TargetKind::Router, load(Mode::Json, 20.0, 700, false)),
                row(TargetKind::LiteLlm, load(Mode::Json, 20.0, 10_100, false)),
            ],
        }]);
        r.targets.push(TargetInfo {
            kind: TargetKind::Router,
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 4500)),
            pid: 15,
        });
        r.router_configs =
            Some(RouterConfigs { router: "[router]\n".into(), discovery: "[discovery]\n".into() });
        let md = r.to_markdown();
        assert!(md.contains("## Summary: the router's added latency"), "{md}");
        let line = md.lines().find(|l| l.starts_with("| JSON, 20 req/s | +400")).unwrap();
        assert_eq!(
            line,
            "| JSON, 20 req/s | +400 µs | +400 µs | +600 µs / +600 µs | +200 µs / +200 µs | +10.00 ms / +10.00 ms | 25× / 25× |"
        );
        assert!(md.contains("| edgeroute router | "), "{md}");
        assert!(md.contains(
            "edgeroute router: `edgeroute router --config router.toml` on 127.0.0.1:4500"
        ));
        assert!(md.contains("Router (`router.toml`):\n\n```toml\n[router]\n```"), "{md}");
        assert!(md.contains("the router and its discovery replica"), "{md}");
    }

    #[test]
    fn endpoints_parse_from_the_command_line() {
        assert_eq!(Endpoint::parse_list("chat").unwrap(), [Endpoint::Chat]);
        assert_eq!(
            Endpoint::parse_list("speech, embeddings,speech").unwrap(),
            [Endpoint::Speech, Endpoint::Embeddings]
        );
        assert_eq!(Endpoint::parse_list("all").unwrap(), Endpoint::ALL);
        assert!(Endpoint::parse_list("chat,tts").unwrap_err().contains("\"tts\""));
        assert!(Endpoint::parse_list(" , ").is_err());
        for e in Endpoint::ALL {
            assert_eq!(e.name().parse::<Endpoint>().unwrap(), e);
            assert!(e.path().starts_with("/v1/"), "{e:?}");
        }
    }

    /// Each endpoint's request is one the node's own parsers accept, and its answers are told
    /// from a wrong one.
    #[tokio::test]
    async fn endpoint_workloads_are_valid_requests_and_check_their_answers() {
        use edgeroute_node::gateway::surface as node;
        let w = |e| Workload::endpoint(e, "sim-llama", "Say hello.", 16).unwrap();
        assert!(Workload::endpoint(Endpoint::Chat, "m", "p", 1).is_err());

        let emb = w(Endpoint::Embeddings);
        assert_eq!((emb.mode, emb.content_type.as_str()), (Mode::Json, "application/json"));
        node::parse_embeddings(&emb.body).unwrap();
        emb.check_answer(br#"{"data":[{"embedding":[0.1,0.2]}]}"#).unwrap();
        assert!(emb.check_answer(br#"{"data":[]}"#).is_err());

        let cmp = w(Endpoint::Completions);
        node::parse_completions(&cmp.body, 64).unwrap();
        cmp.check_answer(br#"{"choices":[{"text":"hi"}]}"#).unwrap();
        assert!(cmp.check_answer(b"<html>").is_err());

        let stt = w(Endpoint::Transcriptions);
        assert_eq!(stt.mode, Mode::Json);
        let parsed = node::parse_upload(
            edgeroute_node::backend::surface::Endpoint::Transcriptions,
            &stt.content_type,
            stt.body.clone(),
        )
        .await
        .unwrap();
        assert_eq!(parsed.model(), "sim-llama");
        // 1 s at 16 kHz, 16-bit: 32,000 bytes of samples, the header and the form around it.
        assert!((32_044..33_000).contains(&stt.body.len()), "{}", stt.body.len());
        stt.check_answer(br#"{"text":"Hello there."}"#).unwrap();
        assert!(stt.check_answer(br#"{"text":""}"#).is_err());

        let tts = w(Endpoint::Speech);
        assert_eq!(tts.mode, Mode::Bytes);
        node::parse_speech(&tts.body).unwrap();
        tts.check_answer(&crate::voice::clip(0, 0.1, 24_000)).unwrap();
        let err = tts.check_answer(br#"{"error":{"message":"no"}}"#).unwrap_err();
        assert!(err.contains("not a speech answer"), "{err}");
    }

    #[test]
    fn markdown_puts_each_endpoint_beside_nginx() {
        let ep = |endpoint, mode, rows| Phase { endpoint, mode, rate: 200.0, rows, steal: None };
        let mut r = report(vec![
            ep(
                Endpoint::Embeddings,
                Mode::Json,
                vec![
                    row(TargetKind::Direct, load(Mode::Json, 200.0, 100, false)),
                    row(TargetKind::Gateway, load(Mode::Json, 200.0, 250, false)),
                    row(TargetKind::Nginx, load(Mode::Json, 200.0, 200, false)),
                ],
            ),
            ep(
                Endpoint::Speech,
                Mode::Bytes,
                vec![
                    row(TargetKind::Direct, load(Mode::Bytes, 200.0, 400, true)),
                    row(TargetKind::Gateway, load(Mode::Bytes, 200.0, 500, true)),
                    row(TargetKind::Nginx, load(Mode::Bytes, 200.0, 600, true)),
                ],
            ),
        ]);
        r.workloads = vec![
            WorkloadInfo {
                endpoint: Endpoint::Embeddings,
                mode: Mode::Json,
                request_bytes: 40,
                answer_bytes: 8_000,
            },
            WorkloadInfo {
                endpoint: Endpoint::Speech,
                mode: Mode::Bytes,
                request_bytes: 80,
                answer_bytes: 76_844,
            },
        ];
        let md = r.to_markdown();
        // No chat phase: no chat summary.
        assert!(!md.contains("## Summary: latency added over direct"), "{md}");
        assert!(md.contains("## Summary: the endpoints beside chat (issue 19)"), "{md}");
        assert!(md.contains("  - `/v1/audio/speech`: 80 bytes sent,"), "{md}");
        assert!(md.contains("the WAV is 76,844 bytes."), "{md}");
        let line = md.lines().find(|l| l.starts_with("| `/v1/embeddings`, 200 req/s |")).unwrap();
        assert_eq!(
            line,
            "| `/v1/embeddings`, 200 req/s | 100 µs / 100 µs | 200 µs / 200 µs | 250 µs / 250 µs | +100 µs | +150 µs | +50 µs |"
        );
        // Speech: first byte (half the total in `load`) and whole answer, each a row.
        let first = md
            .lines()
            .find(|l| l.starts_with("| `/v1/audio/speech`, first audio byte, 200 req/s |"))
            .unwrap();
        assert!(first.ends_with("| +100 µs | +50 µs | −50 µs |"), "{first}");
        assert!(md.contains("| `/v1/audio/speech`, whole audio, 200 req/s |"), "{md}");
        assert!(md.contains("## `/v1/embeddings` at 200 requests/s"), "{md}");
        assert!(md.contains("## `/v1/audio/speech` (a streamed answer) at 200 requests/s"), "{md}");
        assert!(md.contains("Time to the first byte of the answer (first audio):"), "{md}");
        // The verdict under each table says where the gateway stands against nginx.
        assert!(md.contains("gateway − nginx +50 µs"), "{md}");
    }

    #[test]
    fn number_formats() {
        assert_eq!(fmt_us(999), "999 µs");
        assert_eq!(fmt_us(1_500), "1.50 ms");
        assert_eq!(fmt_us(2_500_000), "2.50 s");
        assert_eq!(fmt_delta(-3), "−3 µs");
        assert_eq!(fmt_delta(1200), "+1.20 ms");
        assert_eq!(fmt_rate(5000.0), "5,000");
        assert_eq!(fmt_rate(250.0), "250");
        assert_eq!(fmt_rate(1_234_567.0), "1,234,567");
        assert_eq!(fmt_secs(Duration::from_millis(1500)), "1.5 s");
        assert_eq!(toml_string("a\"b\\c"), r#""a\"b\\c""#);
    }
}
