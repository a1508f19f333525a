//! `edgeroute`: the thin command-line front of the workspace. It parses arguments, reads
//! files and the environment, and calls into the library crates; no logic lives here.

mod bench_discovery;
mod bench_sdk;
mod demo;

/// Request handling allocates many small, short-lived buffers; mimalloc serves them with less
/// CPU than glibc's allocator (measured: see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "edgeroute",
    version,
    about = "Route real-time AI inference across GPU edge nodes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run an edge node gateway.
    Node {
        /// The node's TOML config (see ARCHITECTURE.md and crates/edgeroute-node/src/config.rs).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run a discovery replica.
    Discovery {
        /// The replica's TOML config (crates/edgeroute-discovery/src/config.rs); defaults
        /// otherwise.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Overrides `discovery.listen`.
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Overrides `discovery.worker_threads` (1: a single event loop).
        #[arg(long)]
        threads: Option<usize>,
        /// Serve a synthetic fleet of this many nodes instead of probing and following the
        /// bus (for load benchmarks).
        #[arg(long)]
        synthetic_nodes: Option<usize>,
    },
    /// Run the local proxy: the client SDK behind an OpenAI-compatible endpoint on this machine.
    Proxy {
        #[arg(long, default_value = "127.0.0.1:8089")]
        listen: std::net::SocketAddr,
        /// Discovery base URLs, tried in order.
        #[arg(long, value_delimiter = ',', required = true)]
        discovery: Vec<String>,
        /// Bearer token sent to discovery and nodes.
        #[arg(long, env = "EDGEROUTE_TOKEN", hide_env_values = true)]
        token: Option<String>,
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
    },
    /// Run the simulated inference backend as its own OpenAI-compatible server (no auth).
    Sim {
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: std::net::SocketAddr,
        /// Simulator TOML config; defaults otherwise.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Every delay at zero: the reference backend for overhead benchmarks.
        #[arg(long)]
        zero_latency: bool,
    },
    /// Watcher mode for split deployments: install model directories that appear on a shared
    /// volume into the backend's model repository and ask the backend (Triton) to load them.
    Watch {
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
    },
    /// Mint tokens and build JWKS entries.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Benchmarks; figures for BENCHMARKS.md. Build with --release before publishing numbers.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
    /// A three-region fleet on loopback (simulator nodes, discovery, SDK clients) and a short
    /// story: steady traffic, a drain, a node killed mid-stream, the control plane stopped.
    Demo {
        /// Sessions per phase of the story.
        #[arg(long, default_value_t = 12)]
        sessions: usize,
        /// Streamed turns per session.
        #[arg(long, default_value_t = 4)]
        turns: usize,
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Use this NATS server for the topology bus instead of the embedded one.
        #[arg(long)]
        nats: Option<String>,
        /// Write a report (markdown: summary, TTFT per phase, timeline) into this folder.
        #[arg(long)]
        report: Option<PathBuf>,
        /// How long the story's traffic lasts, seconds (each phase gets its share; sessions
        /// arrive spread over it). Default: a session every 40 ms.
        #[arg(long)]
        duration_s: Option<u64>,
        /// What the nodes serve with: `sim` (the simulator, with speech models and a voice
        /// pipeline) or `openai` (a real OpenAI-compatible upstream, see --upstream).
        #[arg(long, default_value = "sim")]
        backend: String,
        /// The upstream behind every node with `--backend openai` (e.g. llama.cpp's server).
        #[arg(long)]
        upstream: Option<String>,
        /// The upstream's model; default: the first its `/v1/models` lists.
        #[arg(long)]
        model: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Topology propagation: time from a node publishing "model ready" to a subscriber
    /// having it, over the embedded bus or NATS.
    Bus {
        /// `embedded` or `nats`.
        #[arg(long, default_value = "embedded")]
        bus: String,
        /// NATS server URL (with `--bus nats`).
        #[arg(long, default_value = "nats://127.0.0.1:4222")]
        nats_url: String,
        /// Changes to publish and time.
        #[arg(long, default_value_t = 1000)]
        changes: usize,
    },
    /// Discovery under load: `/v1/discover` against synthetic fleets of several sizes, served by
    /// its own process, from an open-loop load generator.
    Discover {
        /// Fleet sizes.
        #[arg(long, value_delimiter = ',', default_value = "60,1000")]
        nodes: Vec<usize>,
        /// Intended request rates, requests/s.
        #[arg(long, value_delimiter = ',', default_value = "10000")]
        rates: Vec<f64>,
        /// Measured seconds per row.
        #[arg(long, default_value_t = 10)]
        duration_s: u64,
        /// Keep-alive connections.
        #[arg(long, default_value_t = 32)]
        connections: usize,
        /// The discovery server's worker threads.
        #[arg(long, default_value_t = 1)]
        server_threads: usize,
    },
    /// Routing architectures side by side on one emulated network, workload and seed:
    /// DNS-style, central proxy, edgeroute, oracle; steady, a node dying, a congested ISP, a
    /// model unloaded.
    Fleet {
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Seconds during which sessions arrive, per run.
        #[arg(long, default_value_t = 30)]
        duration_s: u64,
        /// New voice sessions per second.
        #[arg(long, default_value_t = 4.0)]
        sessions_per_s: f64,
        /// Turns per session.
        #[arg(long, default_value_t = 6)]
        turns: usize,
        /// Scenarios: steady, death, congested, unload.
        #[arg(long, value_delimiter = ',', default_value = "steady,death,congested,unload")]
        scenarios: Vec<String>,
        /// Also write the report (fleet.md, a TTFT chart per scenario) into this folder.
        #[arg(long)]
        report: Option<PathBuf>,
    },
    /// The WAN emulation relay's own cost: round trips direct vs through a link.
    Wan {
        #[arg(long, default_value_t = 2000)]
        rounds: usize,
    },
    /// The client SDK: session start (cold, warm), per-request overhead, failover time.
    Sdk {
        #[arg(long, default_value_t = 1000)]
        rounds: usize,
    },
    /// Topology freshness: a model loaded on a node → listed by discovery, end to end.
    Freshness {
        /// `embedded` or `nats`.
        #[arg(long, default_value = "nats")]
        bus: String,
        #[arg(long, default_value = "nats://127.0.0.1:4222")]
        nats_url: String,
        /// Model loads to time.
        #[arg(long, default_value_t = 200)]
        changes: usize,
    },
    /// Gateway overhead: the same load direct to the simulator, through the gateway, through
    /// nginx and through LiteLLM's proxy, on loopback, in one run.
    Gateway {
        /// Intended request rates, requests/s (LiteLLM only at those up to --litellm-max-rate).
        #[arg(long, value_delimiter = ',', default_value = "20,1000,5000")]
        rates: Vec<f64>,
        /// Modes: json, stream.
        #[arg(long, value_delimiter = ',', default_value = "json,stream")]
        modes: Vec<String>,
        /// Measured seconds per target and phase.
        #[arg(long, default_value_t = 10)]
        duration_s: u64,
        /// Interleaved rounds per phase.
        #[arg(long, default_value_t = 2)]
        rounds: u32,
        /// Keep-alive connections per target.
        #[arg(long, default_value_t = 32)]
        connections: usize,
        /// nginx binary for the reference row ("none" leaves it out).
        #[arg(long, default_value = "/usr/sbin/nginx")]
        nginx: String,
        /// LiteLLM's `litellm` command for its row ("none" leaves it out). Default: the venv
        /// scripts/setup-litellm.sh installs, when present.
        #[arg(long)]
        litellm: Option<String>,
        /// The highest rate LiteLLM is loaded at (one Python worker). Default: 20.
        #[arg(long)]
        litellm_max_rate: Option<f64>,
        /// The gateway's `node.worker_threads` (1: one event loop, like nginx's one worker).
        #[arg(long, default_value_t = 1)]
        gateway_threads: usize,
        /// Keep configs and logs here.
        #[arg(long)]
        work_dir: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Print a signed JWT on stdout.
    Mint {
        /// HS256 shared secret file (as configured in the node's `auth.hs256_secret_file`).
        #[arg(long, conflicts_with = "key_file")]
        secret_file: Option<PathBuf>,
        /// PKCS#8 PEM private key for RS256 or EdDSA.
        #[arg(long, requires = "kid")]
        key_file: Option<PathBuf>,
        /// Algorithm of `--key-file`.
        #[arg(long, value_parser = ["rs256", "eddsa"], default_value = "eddsa")]
        alg: String,
        /// Key id, as in the node's JWKS file.
        #[arg(long)]
        kid: Option<String>,
        /// Tenant.
        #[arg(long)]
        sub: String,
        /// Space-separated scopes: `inference`, `admin`.
        #[arg(long, default_value = "inference")]
        scope: String,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
        #[arg(long)]
        aud: Option<String>,
        #[arg(long)]
        iss: Option<String>,
    },
    /// Print a JWKS entry for a public key PEM.
    Jwk {
        #[arg(long)]
        public_key: PathBuf,
        #[arg(long)]
        kid: String,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("EDGEROUTE_LOG")
                .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
                .unwrap_or_else(|_| {
                    tracing_subscriber::EnvFilter::new(default_filter(&cli.command))
                }),
        )
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal: log files (node.log) stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // The node's config picks its runtime shape, so it is read before the runtime exists.
    let threads = match &cli.command {
        Command::Node { config } => {
            let cfg = load_node_config(config)?;
            let t = cfg.node.worker_threads;
            (t, Some(cfg))
        }
        Command::Discovery { config, listen, threads, synthetic_nodes } => {
            let mut cfg = match config {
                Some(path) => {
                    let text = std::fs::read_to_string(path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    edgeroute_discovery::DiscoveryConfig::from_toml(&text, |k| {
                        std::env::var(k).ok()
                    })?
                }
                None => {
                    edgeroute_discovery::DiscoveryConfig::from_toml("", |k| std::env::var(k).ok())?
                }
            };
            if let Some(l) = listen {
                cfg.discovery.listen = *l;
            }
            if let Some(t) = threads {
                cfg.discovery.worker_threads = *t;
            }
            let rt = runtime(cfg.discovery.worker_threads)?;
            return rt.block_on(run_discovery(cfg, *synthetic_nodes));
        }
        _ => (0, None),
    };
    let rt = runtime(threads.0)?;
    if let (Some(cfg), Command::Node { .. }) = (threads.1, &cli.command) {
        return rt.block_on(run_node(cfg));
    }
    rt.block_on(run(cli))
}

fn default_filter(c: &Command) -> &'static str {
    match c {
        // The comparison's lab fleet runs without auth on purpose: its warnings are noise.
        Command::Bench { command: BenchCommand::Fleet { .. } } => "error",
        Command::Demo { .. } | Command::Bench { .. } => "warn",
        _ => "info",
    }
}

async fn run_discovery(
    cfg: edgeroute_discovery::DiscoveryConfig,
    synthetic_nodes: Option<usize>,
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(cfg.discovery.listen)
        .await
        .with_context(|| format!("binding {}", cfg.discovery.listen))?;
    let addr = listener.local_addr()?;
    let limits = cfg.limits.server_limits();
    let d = edgeroute_discovery::Discovery::build(cfg)?;
    if let Some(n) = synthetic_nodes {
        let entries = edgeroute_discovery::synthetic::fleet(n, 7);
        d.replace_snapshot(edgeroute_discovery::Snapshot::build(
            entries,
            d.weights(),
            1,
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        ));
        eprintln!("edgeroute discovery: synthetic fleet of {n} nodes on {addr}");
        edgeroute_http::serve(listener, d.router(), limits, None, shutdown_signal()).await;
        return Ok(());
    }
    eprintln!("edgeroute discovery listening on {addr}");
    d.serve(listener, shutdown_signal()).await?;
    Ok(())
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Discovery { .. } => unreachable!("handled before the runtime is built"),
        Command::Proxy {
            listen,
            discovery,
            token,
            region,
            cache_file,
            home_region,
            first_token_timeout_ms,
            stall_timeout_ms,
            hedge_after_ms,
            max_sessions,
            session_idle_s,
        } => {
            let cfg = edgeroute_client::ClientConfig {
                discovery,
                token,
                regions: region,
                cache_file,
                home_region,
                first_token_timeout: std::time::Duration::from_millis(first_token_timeout_ms),
                stall_timeout: std::time::Duration::from_millis(stall_timeout_ms),
                hedge_initial: std::time::Duration::from_millis(hedge_after_ms),
                ..Default::default()
            };
            let client = edgeroute_client::Client::new(cfg)?;
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding {listen}"))?;
            eprintln!("edgeroute proxy listening on {}", listener.local_addr()?);
            edgeroute_http::serve(
                listener,
                edgeroute_proxy::router_with(
                    client,
                    edgeroute_proxy::ProxyConfig {
                        max_sessions,
                        session_idle: std::time::Duration::from_secs(session_idle_s),
                        ..Default::default()
                    },
                ),
                edgeroute_http::ServerLimits::default(),
                None,
                shutdown_signal(),
            )
            .await;
            Ok(())
        }
        Command::Bench {
            command:
                BenchCommand::Discover { nodes, rates, duration_s, connections, server_threads },
        } => {
            let opts = bench_discovery::LoadOpts {
                bin: std::env::current_exe()?,
                nodes,
                rates,
                duration: std::time::Duration::from_secs(duration_s),
                connections,
                server_threads,
                command: std::env::args().collect::<Vec<_>>().join(" "),
            };
            println!("{}", bench_discovery::load(opts).await?);
            Ok(())
        }
        Command::Bench {
            command:
                BenchCommand::Fleet { seed, duration_s, sessions_per_s, turns, scenarios, report },
        } => {
            use edgeroute_lab::compare::{self, CompareOpts, Scenario};
            let scenarios = scenarios
                .iter()
                .map(|s| {
                    Scenario::parse(s).with_context(|| {
                        format!(
                            "unknown scenario `{s}` (expected steady, death, congested, unload)"
                        )
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let opts = CompareOpts {
                seed,
                duration: std::time::Duration::from_secs(duration_s),
                sessions_per_s,
                turns,
                scenarios,
                ..CompareOpts::default()
            };
            let command = std::env::args().collect::<Vec<_>>().join(" ");
            eprintln!(
                "{} scenario(s) × {} strategies, {duration_s} s of arrivals each, seed {seed}",
                opts.scenarios.len(),
                opts.strategies.len()
            );
            let rows = compare::run(&opts, &|r| {
                eprintln!(
                    "  {} / {}: {} turns, TTFT p50 {:.1} ms p99 {:.1} ms, {} failed",
                    r.scenario.name(),
                    r.strategy.name(),
                    r.turns,
                    r.ttft_p50_ms,
                    r.ttft_p99_ms,
                    r.failed_requests
                );
            })
            .await?;
            println!("## Routing architectures (`{command}`)\n");
            println!("{}", compare::report::to_markdown(&rows));
            for (what, met) in compare::report::targets(&rows) {
                println!("- {} {what}", if met { "met:" } else { "MISSED:" });
            }
            if let Some(dir) = report {
                let header = format!("# Routing architectures\n\n`{command}`");
                compare::report::write(&dir, &header, &rows)
                    .with_context(|| format!("writing the report into {}", dir.display()))?;
                eprintln!("report written to {}", dir.display());
            }
            Ok(())
        }
        Command::Bench { command: BenchCommand::Wan { rounds } } => {
            let command = std::env::args().collect::<Vec<_>>().join(" ");
            println!("## WAN emulation relay (`{command}`)\n");
            println!("{}", edgeroute_lab::wan::overhead(rounds).await?);
            Ok(())
        }
        Command::Bench { command: BenchCommand::Sdk { rounds } } => {
            let command = std::env::args().collect::<Vec<_>>().join(" ");
            println!("{}", bench_sdk::run(rounds, command).await?);
            Ok(())
        }
        Command::Bench { command: BenchCommand::Freshness { bus, nats_url, changes } } => {
            let cfg = match bus.as_str() {
                "embedded" => edgeroute_bus::BusConfig::embedded(),
                "nats" => edgeroute_bus::BusConfig::nats(nats_url.clone()),
                other => anyhow::bail!("--bus: `{other}` is not embedded or nats"),
            };
            println!("{}", bench_discovery::freshness(cfg, changes).await?);
            Ok(())
        }
        Command::Node { config } => {
            let text = std::fs::read_to_string(&config)
                .with_context(|| format!("reading {}", config.display()))?;
            let cfg = edgeroute_node::NodeConfig::parse(&text, |k| std::env::var(k).ok())?;
            let listener = tokio::net::TcpListener::bind(cfg.node.listen)
                .await
                .with_context(|| format!("binding {}", cfg.node.listen))?;
            eprintln!("edgeroute node `{}` listening on {}", cfg.node.id, listener.local_addr()?);
            edgeroute_node::Node::build(cfg)?.serve(listener, shutdown_signal()).await?;
            Ok(())
        }
        Command::Sim { listen, config, zero_latency } => {
            let mut cfg = match config {
                Some(p) => toml::from_str(
                    &std::fs::read_to_string(&p)
                        .with_context(|| format!("reading {}", p.display()))?,
                )?,
                None => edgeroute_sim::SimConfig::default(),
            };
            if zero_latency {
                cfg.ttft_base_ms = 0;
                cfg.prefill_us_per_token = 0;
                cfg.tokens_per_s = 0.0;
                // The reference must not queue: give it as many slots as the gateway admits.
                for g in &mut cfg.gpus {
                    g.slots = g.slots.max(100_000);
                }
                cfg.max_queue = cfg.max_queue.max(100_000);
            }
            let sim = Arc::new(edgeroute_sim::Simulator::new(cfg)?);
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding {listen}"))?;
            eprintln!("edgeroute sim listening on {}", listener.local_addr()?);
            let limits = edgeroute_http::ServerLimits {
                shutdown_grace: std::time::Duration::from_secs(5),
                ..Default::default()
            };
            edgeroute_http::serve(
                listener,
                edgeroute_sim::server::router(sim),
                limits,
                None,
                shutdown_signal(),
            )
            .await;
            Ok(())
        }
        Command::Token { command } => token(command),
        Command::Watch { shared, repository, triton, settle_ms } => {
            let cfg = edgeroute_node::watcher::WatchConfig {
                shared,
                repository,
                triton_url: triton,
                settle: std::time::Duration::from_millis(settle_ms),
            };
            let installed = edgeroute_node::watcher::run(cfg, shutdown_signal()).await?;
            eprintln!("edgeroute watch: installed {} model(s)", installed.len());
            Ok(())
        }
        Command::Demo {
            sessions,
            turns,
            seed,
            nats,
            report,
            duration_s,
            backend,
            upstream,
            model,
        } => {
            let backend = match (backend.as_str(), upstream) {
                ("sim", None) => demo::DemoBackend::Sim,
                ("sim", Some(_)) => bail!("--upstream needs --backend openai"),
                ("openai", Some(upstream)) => {
                    let upstream = upstream.trim_end_matches('/').to_owned();
                    let model = match model {
                        Some(m) => m,
                        None => demo::upstream_model(&upstream).await?,
                    };
                    demo::DemoBackend::OpenAi { upstream, model }
                }
                ("openai", None) => bail!("--backend openai needs --upstream URL"),
                (other, _) => bail!("--backend: `{other}` is not sim or openai"),
            };
            let duration = duration_s.map(std::time::Duration::from_secs);
            demo::run(demo::DemoOpts { sessions, turns, seed, nats, report, duration, backend })
                .await
                .map(|_| ())
        }
        Command::Bench { command: BenchCommand::Bus { bus, nats_url, changes } } => {
            let cfg = match bus.as_str() {
                "embedded" => edgeroute_bus::BusConfig::embedded(),
                "nats" => edgeroute_bus::BusConfig::nats(nats_url.clone()),
                other => anyhow::bail!("--bus: `{other}` is not embedded or nats"),
            };
            let b = edgeroute_bus::Bus::connect(&cfg).await?;
            let r = edgeroute_bus::propagation(&b, changes).await?;
            let via = if bus == "nats" { format!(" ({nats_url})") } else { String::new() };
            println!(
                "topology propagation over {bus}{via}: {} changes delivered, {} lost, p50 {} µs, p99 {} µs, max {} µs",
                r.n, r.lost, r.p50_us, r.p99_us, r.max_us
            );
            Ok(())
        }
        Command::Bench {
            command:
                BenchCommand::Gateway {
                    rates,
                    modes,
                    duration_s,
                    rounds,
                    connections,
                    nginx,
                    litellm,
                    litellm_max_rate,
                    gateway_threads,
                    work_dir,
                },
        } => {
            use edgeroute_lab::gateway_bench::{GatewayBenchOpts, run};
            let mut opts = GatewayBenchOpts::new(std::env::current_exe()?);
            opts.rates = rates;
            opts.modes = modes
                .iter()
                .map(|m| m.parse())
                .collect::<Result<_, _>>()
                .map_err(|e| anyhow::anyhow!("--modes: {e}"))?;
            opts.duration = std::time::Duration::from_secs(duration_s);
            opts.rounds = rounds;
            opts.connections = connections;
            opts.nginx_bin = (nginx != "none").then(|| PathBuf::from(nginx));
            match litellm.as_deref() {
                Some("none") => opts.litellm_bin = None,
                Some(path) => opts.litellm_bin = Some(PathBuf::from(path)),
                None => {}
            }
            if let Some(r) = litellm_max_rate {
                opts.litellm_max_rate = r;
            }
            opts.work_dir = work_dir;
            opts.gateway_worker_threads = gateway_threads;
            opts.command = std::env::args().collect::<Vec<_>>().join(" ");
            let report = run(opts).await?;
            println!("{}", report.to_markdown());
            Ok(())
        }
    }
}

/// One worker thread gives a single event loop (like an nginx worker); 0 means one per core.
fn runtime(worker_threads: usize) -> Result<tokio::runtime::Runtime> {
    Ok(if worker_threads == 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()?
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if worker_threads > 1 {
            b.worker_threads(worker_threads);
        }
        b.enable_all().build()?
    })
}

fn load_node_config(path: &std::path::Path) -> Result<edgeroute_node::NodeConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(edgeroute_node::NodeConfig::parse(&text, |k| std::env::var(k).ok())?)
}

async fn run_node(cfg: edgeroute_node::NodeConfig) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(cfg.node.listen)
        .await
        .with_context(|| format!("binding {}", cfg.node.listen))?;
    eprintln!("edgeroute node `{}` listening on {}", cfg.node.id, listener.local_addr()?);
    edgeroute_node::Node::build(cfg)?.serve(listener, shutdown_signal()).await?;
    Ok(())
}

fn token(cmd: TokenCommand) -> Result<()> {
    use edgeroute_auth::{MintOptions, Scope, Scopes, SigningKey};
    match cmd {
        TokenCommand::Mint { secret_file, key_file, alg, kid, sub, scope, ttl, aud, iss } => {
            let key = match (secret_file, key_file) {
                (Some(f), None) => {
                    let mut secret =
                        std::fs::read(&f).with_context(|| format!("reading {}", f.display()))?;
                    // Same trimming as the verifier: one trailing newline.
                    if secret.ends_with(b"\n") {
                        secret.pop();
                        if secret.ends_with(b"\r") {
                            secret.pop();
                        }
                    }
                    SigningKey::Hs256(secret)
                }
                (None, Some(f)) => {
                    let pem = std::fs::read_to_string(&f)
                        .with_context(|| format!("reading {}", f.display()))?;
                    if alg == "rs256" {
                        SigningKey::Rs256 { pem }
                    } else {
                        SigningKey::EdDsa { pem }
                    }
                }
                _ => bail!("give --secret-file (HS256) or --key-file with --kid (RS256/EdDSA)"),
            };
            let mut scopes = Scopes::default();
            for s in scope.split_whitespace() {
                scopes.insert(
                    Scope::from_name(s).with_context(|| {
                        format!("unknown scope `{s}` (known: inference, admin)")
                    })?,
                );
            }
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
            let token = edgeroute_auth::mint(
                &key,
                &MintOptions { sub, scopes, aud, iss, ttl_s: ttl, now_unix_s: now, kid, nbf: None },
            )?;
            println!("{token}");
            Ok(())
        }
        TokenCommand::Jwk { public_key, kid } => {
            let pem = std::fs::read_to_string(&public_key)
                .with_context(|| format!("reading {}", public_key.display()))?;
            let jwk = edgeroute_auth::jwk_from_public_pem(&pem, &kid)?;
            println!("{}", serde_json::to_string_pretty(&jwk)?);
            Ok(())
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
