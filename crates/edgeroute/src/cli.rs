//! The command line, and the only place that reads config files and the environment: each
//! command's arguments become the plain config structs its crate's `serve` takes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "edgeroute",
    version,
    about = "Route real-time AI inference across GPU edge nodes"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run an edge node gateway.
    Node {
        /// The node's TOML config (see ARCHITECTURE.md and crates/edgeroute-node/src/config.rs).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run a discovery replica.
    Discovery(DiscoveryArgs),
    /// Run the local proxy: the client SDK behind an OpenAI-compatible endpoint on this machine.
    Proxy(ProxyArgs),
    /// Run a regional router: the SDK's decisions as a shared, multi-tenant, OpenAI-compatible
    /// service for clients that cannot embed the SDK.
    Router {
        /// The router's TOML config (crates/edgeroute-router/src/config.rs).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run the region layer's authoritative GeoDNS for the fleet's zone: the nearest healthy
    /// discovery replicas and regional routers per client subnet (UDP and TCP).
    Dns {
        /// The server's TOML config (crates/edgeroute-dns/src/config.rs).
        #[arg(long, short)]
        config: PathBuf,
        /// Where to answer, UDP and TCP.
        #[arg(long, default_value = "127.0.0.1:5353")]
        listen: std::net::SocketAddr,
        /// Worker threads (0: one per core).
        #[arg(long, default_value_t = 0)]
        threads: usize,
    },
    /// Run the simulated inference backend as its own OpenAI-compatible server (no auth).
    Sim(SimArgs),
    /// Watcher mode for split deployments: install model directories that appear on a shared
    /// volume into the backend's model repository and ask the backend (Triton) to load them.
    Watch(WatchArgs),
    /// Model directories: seal one for `edgeroute watch`; make a Triton entry of a snapshot.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
    /// Mint tokens and build JWKS entries.
    Token {
        #[command(subcommand)]
        command: crate::token::TokenCommand,
    },
    /// Routing policies: check a document, dry-run it against a running discovery, push it to
    /// every replica over the bus.
    Policy {
        #[command(subcommand)]
        command: crate::policy::PolicyCommand,
    },
    /// Roll a model out from one version to the next, region by region, behind validation
    /// gates (state on the bus: `start` resumes, `status` shows it, `abort` rolls back).
    Rollout {
        #[command(subcommand)]
        command: crate::rollout::RolloutCommand,
    },
    /// Topology bus identities: generate a node's, discovery replica's or policy admin's NATS
    /// credentials.
    Bus {
        #[command(subcommand)]
        command: crate::bus::BusCommand,
    },
}

#[derive(Args, Debug)]
pub struct DiscoveryArgs {
    /// The replica's TOML config (crates/edgeroute-discovery/src/config.rs); defaults
    /// otherwise.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Overrides `discovery.listen`.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Overrides `discovery.worker_threads` (1: a single event loop).
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(Args, Debug)]
pub struct ProxyArgs {
    #[arg(long, default_value = "127.0.0.1:8089")]
    pub listen: SocketAddr,
    /// Discovery base URLs, tried in order; `dns:NAME[:PORT]` (e.g. `dns:discovery.example.net`)
    /// stands for the replicas the fleet's GeoDNS names for this machine, nearest first
    /// (SRV, else A/AAAA; always https; the last resolution persisted with --cache-file).
    #[arg(long, value_delimiter = ',', required = true)]
    discovery: Vec<String>,
    /// Nameservers for `dns:` discovery entries (`IP:PORT`, comma-separated). Default: those
    /// of /etc/resolv.conf.
    #[arg(long, value_delimiter = ',')]
    dns_server: Vec<SocketAddr>,
    /// PEM roots for https:// discovery and nodes (a private fleet CA). Default: the Mozilla
    /// roots compiled in.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// A file holding the bearer token for discovery and nodes (else `EDGEROUTE_TOKEN`). Never
    /// on the command line: every local user can read it there (`ps`).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Refused (a token on the command line is visible in `ps`): use --token-file or
    /// EDGEROUTE_TOKEN. The value is dropped unread.
    #[arg(long, hide = true, value_parser = |_: &str| Ok::<_, String>(TokenOnCommandLine))]
    token: Option<TokenOnCommandLine>,
    /// Host names besides loopback that callers may use to reach the proxy (DNS-rebinding guard).
    #[arg(long, value_delimiter = ',')]
    allow_host: Vec<String>,
    /// Browser origins allowed to call the proxy; by default any request with `Origin` is refused.
    #[arg(long, value_delimiter = ',')]
    allow_origin: Vec<String>,
    /// Send the token over plaintext http:// to hosts that are not loopback (a private network).
    #[arg(long)]
    allow_plaintext: bool,
    /// Data residency: only nodes in these regions.
    #[arg(long, value_delimiter = ',')]
    region: Vec<String>,
    /// Persist discovery answers here (used when discovery is down at start).
    #[arg(long)]
    cache_file: Option<PathBuf>,
    /// Where this machine is: that region's best node is always among the probes.
    #[arg(long)]
    home_region: Option<String>,
    /// A stream's first token must arrive within this, or the request moves to another
    /// node. Raise it for slow (CPU) backends.
    #[arg(long, default_value_t = 3000)]
    first_token_timeout_ms: u64,
    /// A longer gap between two tokens is a stall: the answer continues on another node.
    #[arg(long, default_value_t = 2000)]
    stall_timeout_ms: u64,
    /// Sessions kept at once (least recently used dropped first).
    #[arg(long, default_value_t = 10_000)]
    max_sessions: usize,
    /// A session unused this long is dropped, seconds.
    #[arg(long, default_value_t = 600)]
    session_idle_s: u64,
    /// Hedge to the standby when the first token is this late on a node nothing is known
    /// of yet; afterwards the deadline is a multiple of that node's own first token.
    #[arg(long, default_value_t = 1000)]
    hedge_after_ms: u64,
    /// A routing policy's cloud pool and the file holding its API key (`NAME=PATH`,
    /// repeatable): requests the policy sends to that pool carry this key, never the fleet
    /// token. A pool without one is sent no key.
    #[arg(long = "pool-key-file", value_name = "NAME=PATH", value_parser = parse_pool_key)]
    pool_key_files: Vec<(String, PathBuf)>,
    /// What a policy's canary split keeps on one version (default: random per start).
    #[arg(long)]
    routing_key: Option<String>,
}

fn parse_pool_key(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((name, path)) if !name.is_empty() && !path.is_empty() => {
            Ok((name.to_owned(), PathBuf::from(path)))
        }
        _ => Err(format!("`{s}`: give NAME=PATH (the pool's name in the policy, a key file)")),
    }
}

#[derive(Args, Debug)]
pub struct SimArgs {
    #[arg(long, default_value = "127.0.0.1:9000")]
    pub listen: SocketAddr,
    /// Simulator TOML config; defaults otherwise.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Every delay at zero: the reference backend for overhead benchmarks.
    #[arg(long)]
    zero_latency: bool,
}

#[derive(Args, Debug)]
pub struct WatchArgs {
    /// The shared volume the gateway writes models to.
    #[arg(long)]
    shared: PathBuf,
    /// The backend's model repository.
    #[arg(long)]
    repository: PathBuf,
    /// Triton's HTTP endpoint (repository API); without it models are only copied.
    #[arg(long)]
    triton: Option<String>,
    /// Quiet time before a new directory is taken, ms.
    #[arg(long, default_value_t = 2000)]
    settle_ms: u64,
    /// A backend whose models may carry code (e.g. `python`); repeat for more. Default: none,
    /// so a model with a Python backend, an execution environment or a `.py` file is refused.
    #[arg(long = "allow-backend")]
    allow_backends: Vec<String>,
    /// The header of Triton's restricted repository API
    /// (`--http-restricted-api=model-repository:<name>=<value>`), with --triton-restricted-key-env.
    #[arg(long, requires = "triton_restricted_key_env")]
    triton_restricted_header: Option<String>,
    /// The environment variable holding that header's value.
    #[arg(long, requires = "triton_restricted_header")]
    triton_restricted_key_env: Option<String>,
    /// A key seals are trusted under, `KID=FILE` (an Ed25519 public key PEM: the node's
    /// `models.seal_key_file`'s, or `edgeroute model seal`'s); repeat for rotation. Only
    /// directories sealed by one of these keys are installed.
    #[arg(long = "seal-public-key", value_name = "KID=FILE")]
    seal_public_keys: Vec<String>,
    /// Install directories that carry no seal (a sealed one must still verify). Without any
    /// --seal-public-key this flag is required: whoever can write to the shared volume then
    /// chooses what the backend loads.
    #[arg(long)]
    allow_unsealed: bool,
    /// Carry out the gateway's signed load orders (`models.downloads = "sidecar"`): download
    /// from the Hugging Face hub with the token in this file (this process is then its only
    /// holder), convert for Triton, install, load. Needs --seal-public-key.
    #[arg(long, value_name = "FILE")]
    hf_token_file: Option<PathBuf>,
    /// The hub (or a mirror) orders download from.
    #[arg(long, default_value = edgeroute_node::orders::DEFAULT_ENDPOINT, requires = "hf_token_file")]
    hub_endpoint: String,
    /// A host downloads may be redirected to (the hub's CDN); repeat for more.
    #[arg(long = "hub-allowed-host", requires = "hf_token_file")]
    hub_allowed_hosts: Vec<String>,
    /// Where orders' downloads are kept (never the shared volume, which the gateway can
    /// write). Default: `.edgeroute-downloads` in --repository (one filesystem, so entries
    /// hard-link their weights).
    #[arg(long, requires = "hf_token_file")]
    downloads: Option<PathBuf>,
    /// Free disk space kept after a download, MiB.
    #[arg(long, default_value_t = 1024)]
    disk_margin_mb: u64,
    /// How often the orders are read again besides change events (a network filesystem does
    /// not report another machine's writes), ms.
    #[arg(long, default_value_t = 2000)]
    order_poll_ms: u64,
}

#[derive(Subcommand, Debug)]
pub enum ModelCommand {
    /// Seal a Triton model directory (`.edgeroute-seal`: a signed list of every file with its
    /// size and SHA-256) so that `edgeroute watch --seal-public-key` installs it. Seal last,
    /// after every file is written; the directory must then be copied as a whole.
    Seal {
        /// The model directory (holding `config.pbtxt`).
        #[arg(long)]
        dir: PathBuf,
        /// The backend model name; the directory must appear on the shared volume under it.
        #[arg(long)]
        model: String,
        /// PKCS#8 PEM Ed25519 private key.
        #[arg(long)]
        key_file: PathBuf,
        /// Key id, as given to `edgeroute watch --seal-public-key KID=FILE`.
        #[arg(long)]
        kid: String,
        /// Who sealed it (recorded in the seal).
        #[arg(long, default_value = "edgeroute-model-seal")]
        issuer: String,
    },
    /// Make the Triton repository entry a node makes of a Hugging Face snapshot on
    /// `POST /v1/models/load` (config.json + *.safetensors → the vLLM backend, one .onnx →
    /// ONNX Runtime, pinned to --gpu): prints its config.pbtxt, or with --out writes the whole
    /// entry as `<out>/<name>/` (unsealed: seal it with `edgeroute model seal`).
    TritonConfig {
        /// The snapshot directory (its files under their repository paths).
        #[arg(long)]
        dir: PathBuf,
        /// The Triton model name.
        #[arg(long)]
        name: String,
        /// The CUDA device index the model's instance group is pinned to.
        #[arg(long, default_value_t = 0)]
        gpu: u32,
        /// Triton's model repository as Triton sees it (a vLLM entry names its weights by an
        /// absolute path under it). Default: --out.
        #[arg(long)]
        repository: Option<PathBuf>,
        /// Write the entry into this repository directory instead of printing its config.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

impl ModelCommand {
    pub fn run(self) -> Result<()> {
        match self {
            ModelCommand::Seal { dir, model, key_file, kid, issuer } => {
                use edgeroute_node::watcher::{SealSigner, seal_dir};
                if !edgeroute_node::backend::triton::valid_model_name(&model) {
                    anyhow::bail!(
                        "--model `{model}` is not a valid model name ([A-Za-z0-9._-], ≤ 128, not starting with `.`)"
                    );
                }
                let signer = SealSigner::from_pem(&read(&key_file)?, &kid, &issuer)
                    .with_context(|| format!("--key-file {}", key_file.display()))?;
                let now = edgeroute_core::clock::unix_ms() / 1000;
                let seal = seal_dir(&dir, &model, &signer, now)
                    .with_context(|| format!("sealing {}", dir.display()))?;
                let bytes: u64 = seal.files.iter().map(|f| f.bytes).sum();
                eprintln!(
                    "sealed `{model}` ({} files, {bytes} bytes) with key `{kid}`",
                    seal.files.len()
                );
                Ok(())
            }
            ModelCommand::TritonConfig { dir, name, gpu, repository, out } => {
                triton_config(&dir, &name, gpu, repository.or_else(|| out.clone()), out)
            }
        }
    }
}

/// `edgeroute model triton-config`: the node's own conversion ([`edgeroute_node::convert`])
/// over a directory instead of a hub install.
fn triton_config(
    dir: &Path,
    name: &str,
    gpu: u32,
    repository: Option<PathBuf>,
    out: Option<PathBuf>,
) -> Result<()> {
    use edgeroute_node::convert;
    let repository = repository
        .context("give --repository (Triton's model repository as Triton sees it) or --out")?;
    let repository = std::path::absolute(&repository)
        .with_context(|| format!("--repository {}", repository.display()))?;
    let files = convert::snapshot_files(dir).with_context(|| format!("--dir {}", dir.display()))?;
    let config = convert::read_config_json(dir)?;
    let target = convert::Target { name, device: gpu, repository: &repository };
    let entry = convert::plan_entry(&files, config.as_deref(), &target)?;
    let Some(out) = out else {
        print!("{}", entry.config_pbtxt());
        return Ok(());
    };
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let staging = out.join(format!(".staging-triton-config-{}", std::process::id()));
    let path = convert::write_entry(&entry, dir, &out, &staging, |staged, model| {
        // The same check the node runs before sealing, and the watcher before installing.
        edgeroute_node::watcher::check_code(staged, &repository.join(model), &[])
    })?;
    eprintln!("wrote {} ({} files)", path.display(), entry.files.len());
    Ok(())
}

pub fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// The process environment: the one lookup every config loader is handed.
#[allow(clippy::disallowed_methods)] // The binary is the edge where the environment is read.
pub fn env(key: &str) -> Option<String> {
    std::env::var(key).ok()
}

pub fn node_config(path: &Path) -> Result<edgeroute_node::NodeConfig> {
    Ok(edgeroute_node::NodeConfig::parse(&read(path)?, env)?)
}

impl DiscoveryArgs {
    pub fn config(&self) -> Result<edgeroute_discovery::DiscoveryConfig> {
        let text = match &self.config {
            Some(path) => read(path)?,
            None => String::new(),
        };
        let mut cfg = edgeroute_discovery::DiscoveryConfig::from_toml(&text, env)?;
        if let Some(l) = self.listen {
            cfg.discovery.listen = l;
        }
        if let Some(t) = self.threads {
            cfg.discovery.worker_threads = t;
        }
        Ok(cfg)
    }
}

/// `--token` was given: refused, its value never kept.
#[derive(Debug, Clone)]
pub struct TokenOnCommandLine;

impl ProxyArgs {
    pub fn config(self) -> Result<(edgeroute_client::ClientConfig, edgeroute_proxy::ProxyConfig)> {
        if self.token.is_some() {
            anyhow::bail!(
                "--token is refused: a token on the command line is visible to every user (ps); \
                 put it in a file readable only by you and pass --token-file PATH, or set \
                 EDGEROUTE_TOKEN"
            );
        }
        let token = match &self.token_file {
            Some(path) => Some(edgeroute_proxy::read_token_file(path)?),
            None => env("EDGEROUTE_TOKEN").filter(|t| !t.trim().is_empty()),
        };
        let mut pool_keys = std::collections::BTreeMap::new();
        for (name, path) in &self.pool_key_files {
            let key = edgeroute_proxy::read_token_file(path)
                .with_context(|| format!("--pool-key-file {name}"))?;
            pool_keys.insert(name.clone(), key);
        }
        let client = edgeroute_client::ClientConfig {
            discovery: self.discovery,
            dns_servers: self.dns_server,
            ca_file: self.ca_file,
            pool_keys,
            routing_key: self.routing_key,
            token,
            allow_plaintext: self.allow_plaintext,
            regions: self.region,
            cache_file: self.cache_file,
            home_region: self.home_region,
            first_token_timeout: Duration::from_millis(self.first_token_timeout_ms),
            stall_timeout: Duration::from_millis(self.stall_timeout_ms),
            hedge_initial: Duration::from_millis(self.hedge_after_ms),
            ..Default::default()
        };
        let proxy = edgeroute_proxy::ProxyConfig {
            max_sessions: self.max_sessions,
            session_idle: Duration::from_secs(self.session_idle_s),
            allowed_hosts: self.allow_host,
            allowed_origins: self.allow_origin,
            ..Default::default()
        };
        Ok((client, proxy))
    }
}

impl SimArgs {
    pub fn config(&self) -> Result<edgeroute_sim::SimConfig> {
        let cfg = match &self.config {
            Some(path) => toml::from_str(&read(path)?)
                .with_context(|| format!("parsing {}", path.display()))?,
            None => edgeroute_sim::SimConfig::default(),
        };
        Ok(if self.zero_latency { cfg.into_overhead_reference() } else { cfg })
    }
}

impl WatchArgs {
    pub fn config(self) -> Result<edgeroute_node::watcher::WatchConfig> {
        let triton_restricted =
            match (self.triton_restricted_header, self.triton_restricted_key_env) {
                (Some(name), Some(var)) => {
                    let value = env(&var).with_context(|| {
                        format!("--triton-restricted-key-env: `{var}` is not set")
                    })?;
                    Some((name, value))
                }
                _ => None,
            };
        let mut keys = Vec::new();
        for spec in &self.seal_public_keys {
            let (kid, file) = spec
                .split_once('=')
                .with_context(|| format!("--seal-public-key `{spec}`: expected KID=FILE"))?;
            keys.push((kid.to_owned(), read(Path::new(file))?));
        }
        let seal_keys = if keys.is_empty() {
            None
        } else {
            Some(
                edgeroute_node::watcher::seal::SealVerifier::from_public_pems(&keys)
                    .context("--seal-public-key")?,
            )
        };
        let hub = match &self.hf_token_file {
            None => None,
            Some(file) => {
                let token = read(file)?.trim().to_owned();
                if token.is_empty() {
                    anyhow::bail!("--hf-token-file {}: the file is empty", file.display());
                }
                Some(edgeroute_node::orders::HubSettings {
                    hub: edgeroute_node::orders::HubConfig {
                        endpoint: self.hub_endpoint.clone(),
                        token: Some(token),
                        allowed_hosts: self.hub_allowed_hosts.clone(),
                        ..edgeroute_node::orders::HubConfig::default()
                    },
                    downloads: self
                        .downloads
                        .clone()
                        .unwrap_or_else(|| self.repository.join(".edgeroute-downloads")),
                    disk_margin_bytes: self.disk_margin_mb.saturating_mul(1024 * 1024),
                })
            }
        };
        Ok(edgeroute_node::watcher::WatchConfig {
            hub,
            order_poll: Duration::from_millis(self.order_poll_ms),
            seal_keys,
            allow_unsealed: self.allow_unsealed,
            shared: self.shared,
            repository: self.repository,
            triton_url: self.triton,
            settle: Duration::from_millis(self.settle_ms),
            allow_backends: self.allow_backends,
            triton_restricted,
        })
    }
}

/// Reads and checks a GeoDNS config.
pub fn dns_config(path: &std::path::Path) -> Result<edgeroute_dns::DnsConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(edgeroute_dns::DnsConfig::from_toml(&text)?)
}

/// Reads and checks a router config.
pub fn router_config(path: &std::path::Path) -> Result<edgeroute_router::RouterConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(edgeroute_router::RouterConfig::from_toml(&text)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pool_key_is_a_name_and_a_file() {
        assert_eq!(parse_pool_key("ca-cloud=/k").unwrap(), ("ca-cloud".into(), "/k".into()));
        assert!(parse_pool_key("ca-cloud").is_err());
        assert!(parse_pool_key("=/k").is_err() && parse_pool_key("ca-cloud=").is_err());
    }

    #[test]
    fn the_proxy_takes_a_dns_discovery_its_nameserver_and_a_ca() {
        let cli = Cli::try_parse_from([
            "edgeroute",
            "proxy",
            "--discovery",
            "dns:discovery.edge.test,https://backup.example:7070",
            "--dns-server",
            "127.0.0.1:5353",
            "--ca-file",
            "/etc/fleet-ca.pem",
        ])
        .unwrap();
        let Command::Proxy(args) = cli.command else { panic!("not the proxy") };
        let (client, _) = args.config().unwrap();
        assert_eq!(client.discovery, ["dns:discovery.edge.test", "https://backup.example:7070"]);
        assert_eq!(client.dns_servers, ["127.0.0.1:5353".parse::<SocketAddr>().unwrap()]);
        assert_eq!(client.ca_file.as_deref(), Some(std::path::Path::new("/etc/fleet-ca.pem")));
        // The client refuses a malformed name when it is built (the proxy's start).
        let cfg =
            edgeroute_client::ClientConfig { discovery: vec!["dns:not a name".into()], ..client };
        assert!(edgeroute_client::Client::new(cfg).is_err());
    }
}
