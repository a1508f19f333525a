//! `edgeroute-lab`: the demo and the benchmarks behind BENCHMARKS.md, as a binary of their own
//! so that the shipped `edgeroute` binary carries none of the lab (synthetic fleets, emulated
//! WANs, load generators). It parses the command line and calls the library's modules.
//!
//! `bench gateway` runs the real `edgeroute` binary (sim, node, token) as child processes: by
//! default the one built next to this binary (`cargo build --release -p edgeroute`).

/// The same allocator as the `edgeroute` binary: the demo and the in-process benchmarks run the
/// real node and discovery code, and their figures must be the production ones.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use edgeroute_lab::batch_bench::{self, BatchBenchOpts, Capacity, Store};
use edgeroute_lab::compare::{self, CompareOpts, Scenario, Strategy};
use edgeroute_lab::demo::{self, DemoBackend, DemoOpts};
use edgeroute_lab::gateway_bench::{self, GatewayBenchOpts};
use edgeroute_lab::{bus_bench, discovery_bench, policy_bench, sdk_bench, wan};

#[derive(Parser, Debug)]
#[command(name = "edgeroute-lab", version, about = "edgeroute's demo and benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
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
        /// With `--bus nats`: start a nats-server of its own from deploy/nats/nats-server.conf
        /// and time a node user's changes to a discovery user (`--nats-url` is unused).
        #[arg(long)]
        auth: bool,
    },
    /// A routing policy pushed over NATS (its own nats-server, the shipped configuration, an
    /// admin user) to three discovery replicas following the bus: time from the put to all
    /// three having it in force (their acknowledgements, cross-checked against /health).
    PolicyPush {
        /// Policies pushed, one after another.
        #[arg(long, default_value_t = 200)]
        pushes: usize,
        /// Rules per policy (`synthetic::policy`).
        #[arg(long, default_value_t = 50)]
        rules: usize,
        /// Synthetic nodes each replica knows (the fleet each text is checked against).
        #[arg(long, default_value_t = 60)]
        nodes: usize,
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
        /// Serve with a routing policy of this many rules (`synthetic::policy`: the last one
        /// matches, with a canary, thresholds and a cascade); 0: no policy.
        #[arg(long, default_value_t = 0)]
        policy_rules: usize,
        /// Instead of benchmarking, serve a synthetic fleet of this many nodes on `--listen`
        /// (the benchmark's server process: it starts this binary again this way).
        #[arg(long, requires = "listen")]
        synthetic_nodes: Option<usize>,
        /// Where `--synthetic-nodes` serves.
        #[arg(long)]
        listen: Option<SocketAddr>,
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
        /// Strategies: dns, central, edgeroute, edgeroute-dns (the SDK told only the zone
        /// name; the fleet's GeoDNS answers), oracle.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "dns,central,edgeroute,edgeroute-dns,oracle"
        )]
        strategies: Vec<String>,
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
    /// Soak: a real node under well-behaved JSON and SSE traffic beside hostile requests (slow
    /// bodies, oversize, beyond-context prompts, bad tokens, abandoned streams); RSS and open
    /// descriptors sampled every second.
    Soak {
        /// Measured seconds.
        #[arg(long, default_value_t = 120)]
        duration_s: u64,
        /// Well-behaved requests per second (half JSON, half SSE).
        #[arg(long, default_value_t = 200.0)]
        rate: f64,
        /// Hostile requests per second, over five kinds.
        #[arg(long, default_value_t = 50.0)]
        hostile_rate: f64,
        /// The `edgeroute` binary. Default: next to this one.
        #[arg(long)]
        edgeroute: Option<PathBuf>,
    },
    /// Batch throughput: a simulator fleet of known capacity, discovery and `edgeroute router`
    /// with `[jobs]`; one batch through `/v1/files` + `/v1/batches`, items/s against capacity.
    Batch {
        /// Simulator nodes.
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        /// Slots per node.
        #[arg(long, default_value_t = 8)]
        slots: u32,
        /// Decode speed per slot.
        #[arg(long, default_value_t = 100.0)]
        tokens_per_s: f64,
        /// Time to first token, ms.
        #[arg(long, default_value_t = 50)]
        ttft_ms: u64,
        /// Tokens per item (every answer exactly this long).
        #[arg(long, default_value_t = 16)]
        max_tokens: u32,
        /// Items in the batch.
        #[arg(long, default_value_t = 800)]
        items: usize,
        /// `[jobs] workers`, one run each.
        #[arg(long, value_delimiter = ',', default_value = "16,64")]
        workers: Vec<usize>,
        /// Also run on this PostgreSQL (a schema of its own per run, dropped with `psql`), e.g.
        /// `postgres://postgres@127.0.0.1:5432/test`.
        #[arg(long)]
        postgres: Option<String>,
        /// Leave SQLite out (with --postgres).
        #[arg(long)]
        no_sqlite: bool,
        /// Keep configs and logs here.
        #[arg(long)]
        work_dir: Option<PathBuf>,
        /// The `edgeroute` binary. Default: the one next to this binary.
        #[arg(long)]
        edgeroute: Option<PathBuf>,
    },
    /// The region layer: `edgeroute dns` and PowerDNS (Lua health checks) serving the same
    /// zone and regions, loaded by dnsperf, then a region's death (scripts/setup-dnsbench.sh
    /// installs dnsperf and PowerDNS).
    Dns {
        /// Fixed offered rates, queries/s.
        #[arg(long, value_delimiter = ',', default_value = "5000,10000,20000,40000")]
        rates: Vec<u32>,
        /// Seconds per dnsperf run.
        #[arg(long, default_value_t = 5)]
        duration_s: u64,
        /// Failover trials.
        #[arg(long, default_value_t = 5)]
        trials: u32,
        /// `edgeroute dns` worker threads.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// `pdns_server` for the reference ("none" leaves it out).
        #[arg(long, default_value = "/usr/sbin/pdns_server")]
        pdns: String,
        /// Keep configs and logs here.
        #[arg(long)]
        work_dir: Option<PathBuf>,
        /// The `edgeroute` binary. Default: the one next to this binary.
        #[arg(long)]
        edgeroute: Option<PathBuf>,
    },
    /// Gateway overhead: the same load direct to the simulator, through the gateway, through
    /// nginx and through LiteLLM's proxy, on loopback, in one run; chat by default, the voice
    /// surface's endpoints with --endpoints.
    Gateway {
        /// Intended request rates, requests/s (LiteLLM only at those up to --litellm-max-rate).
        #[arg(long, value_delimiter = ',', default_value = "20,1000,5000")]
        rates: Vec<f64>,
        /// Chat's modes: json, stream.
        #[arg(long, value_delimiter = ',', default_value = "json,stream")]
        modes: Vec<String>,
        /// Workloads: chat (in --modes) and the voice surface's endpoints beside it —
        /// embeddings, completions (JSON), transcriptions (a multipart upload of a 1 s WAV),
        /// speech (a WAV stream: first byte and end) — comma-separated, or `all`. Each is
        /// measured direct, through nginx and through the gateway (LiteLLM and the router
        /// with chat only).
        #[arg(long, default_value = "chat")]
        endpoints: String,
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
        /// Also measure `edgeroute router` in front of the same gateway (with an `edgeroute
        /// discovery` process over that one node): the report states router minus gateway.
        #[arg(long)]
        router: bool,
        /// Keep configs and logs here.
        #[arg(long)]
        work_dir: Option<PathBuf>,
        /// The `edgeroute` binary whose `sim` and `node` are measured. Default: the one next to
        /// this binary.
        #[arg(long)]
        edgeroute: Option<PathBuf>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // The comparison's lab fleet runs without auth on purpose: its warnings are noise.
    let filter = match &cli.command {
        Command::Bench { command: BenchCommand::Fleet { .. } } => "error",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("EDGEROUTE_LOG")
                .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // The synthetic discovery server runs on the threads it is benchmarked with.
    let threads = match &cli.command {
        Command::Bench {
            command: BenchCommand::Discover { synthetic_nodes: Some(_), server_threads, .. },
        } => *server_threads,
        _ => 0,
    };
    edgeroute_http::runtime(threads)?.block_on(run(cli.command))
}

async fn run(command: Command) -> Result<()> {
    let command_line = std::env::args().collect::<Vec<_>>().join(" ");
    let bench = match command {
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
            let backend = DemoBackend::from_flags(&backend, upstream, model).await?;
            let duration = duration_s.map(Duration::from_secs);
            demo::run(DemoOpts { sessions, turns, seed, nats, report, duration, backend }).await?;
            return Ok(());
        }
        Command::Bench { command } => command,
    };
    match bench {
        BenchCommand::Bus { bus, nats_url, changes, auth } => {
            println!("{}", bus_bench::run(&bus, &nats_url, changes, auth).await?);
        }
        BenchCommand::PolicyPush { pushes, rules, nodes } => {
            println!("{}", policy_bench::run(pushes, rules, nodes).await?);
        }
        BenchCommand::Discover {
            synthetic_nodes: Some(n),
            listen: Some(listen),
            policy_rules,
            ..
        } => {
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding {listen}"))?;
            eprintln!("edgeroute-lab: synthetic fleet of {n} nodes on {}", listener.local_addr()?);
            discovery_bench::serve_synthetic(
                n,
                policy_rules,
                listener,
                edgeroute_http::shutdown_signal(),
            )
            .await?;
        }
        BenchCommand::Discover {
            nodes,
            rates,
            duration_s,
            connections,
            server_threads,
            policy_rules,
            ..
        } => {
            let opts = discovery_bench::LoadOpts {
                bin: std::env::current_exe()?,
                nodes,
                rates,
                duration: Duration::from_secs(duration_s),
                connections,
                server_threads,
                policy_rules,
                command: command_line,
            };
            println!("{}", discovery_bench::load(opts).await?);
        }
        BenchCommand::Fleet {
            seed,
            duration_s,
            sessions_per_s,
            turns,
            scenarios,
            strategies,
            report,
        } => {
            let strategies = strategies
                .iter()
                .map(|s| {
                    Strategy::parse(s).with_context(|| {
                        format!(
                            "unknown strategy `{s}` (expected dns, central, edgeroute, edgeroute-dns, oracle)"
                        )
                    })
                })
                .collect::<Result<Vec<_>>>()?;
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
                duration: Duration::from_secs(duration_s),
                sessions_per_s,
                turns,
                scenarios,
                strategies,
                ..CompareOpts::default()
            };
            fleet(&opts, &command_line, report).await?;
        }
        BenchCommand::Wan { rounds } => {
            println!("## WAN emulation relay (`{command_line}`)\n");
            println!("{}", wan::overhead(rounds).await?);
        }
        BenchCommand::Sdk { rounds } => {
            println!("{}", sdk_bench::run(rounds, command_line).await?);
        }
        BenchCommand::Freshness { bus, nats_url, changes } => {
            let cfg = bus_bench::config(&bus, &nats_url)?;
            println!("{}", discovery_bench::freshness(cfg, changes).await?);
        }
        BenchCommand::Soak { duration_s, rate, hostile_rate, edgeroute } => {
            let mut opts = edgeroute_lab::soak::SoakOpts::new(match edgeroute {
                Some(path) => path,
                None => edgeroute_next_to_this_binary()?,
            });
            opts.duration = Duration::from_secs(duration_s);
            opts.rate = rate;
            opts.hostile_rate = hostile_rate;
            opts.command = command_line;
            let report = edgeroute_lab::soak::run(opts).await?;
            println!("{}", report.to_markdown());
            anyhow::ensure!(
                report.legit_errors() == 0 && report.hostile_unexpected() == 0 && report.flat(),
                "the soak failed its targets (see above)"
            );
        }
        BenchCommand::Batch {
            nodes,
            slots,
            tokens_per_s,
            ttft_ms,
            max_tokens,
            items,
            workers,
            postgres,
            no_sqlite,
            work_dir,
            edgeroute,
        } => {
            let mut opts = BatchBenchOpts::new(match edgeroute {
                Some(path) => path,
                None => edgeroute_next_to_this_binary()?,
            });
            opts.capacity = Capacity { nodes, slots, tokens_per_s, ttft_ms, max_tokens };
            opts.items = items;
            opts.workers = workers;
            opts.stores = (!no_sqlite).then_some(Store::Sqlite).into_iter().collect();
            opts.stores.extend(postgres.map(Store::Postgres));
            opts.work_dir = work_dir;
            opts.command = command_line;
            let report = batch_bench::run(opts).await?;
            println!("{}", report.to_markdown());
            anyhow::ensure!(
                report.runs.iter().all(|r| r.files.all_answered(r.items)),
                "not every item was answered once in the output file (see above)"
            );
        }
        BenchCommand::Dns { rates, duration_s, trials, threads, pdns, work_dir, edgeroute } => {
            let mut opts = edgeroute_lab::dns_bench::DnsBenchOpts::new(match edgeroute {
                Some(path) => path,
                None => edgeroute_next_to_this_binary()?,
            });
            opts.rates = rates;
            opts.duration = Duration::from_secs(duration_s);
            opts.trials = trials;
            opts.threads = threads;
            opts.pdns_bin = (pdns != "none").then(|| PathBuf::from(pdns));
            opts.work_dir = work_dir;
            opts.command = command_line;
            println!("{}", edgeroute_lab::dns_bench::run(opts).await?.to_markdown());
        }
        BenchCommand::Gateway {
            rates,
            modes,
            endpoints,
            duration_s,
            rounds,
            connections,
            nginx,
            litellm,
            litellm_max_rate,
            gateway_threads,
            router,
            work_dir,
            edgeroute,
        } => {
            let mut opts = GatewayBenchOpts::new(match edgeroute {
                Some(path) => path,
                None => edgeroute_next_to_this_binary()?,
            });
            opts.rates = rates;
            opts.modes = modes
                .iter()
                .map(|m| m.parse())
                .collect::<Result<_, _>>()
                .map_err(|e| anyhow::anyhow!("--modes: {e}"))?;
            opts.endpoints = gateway_bench::Endpoint::parse_list(&endpoints)
                .map_err(|e| anyhow::anyhow!("--endpoints: {e}"))?;
            opts.duration = Duration::from_secs(duration_s);
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
            opts.router = router;
            opts.command = command_line;
            println!("{}", gateway_bench::run(opts).await?.to_markdown());
        }
    }
    Ok(())
}

/// `bench fleet`: progress on stderr, the figures and the targets on stdout, and the report
/// (markdown and charts) in `report` when asked.
async fn fleet(opts: &CompareOpts, command: &str, report: Option<PathBuf>) -> Result<()> {
    eprintln!(
        "{} scenario(s) × {} strategies, {} s of arrivals each, seed {}",
        opts.scenarios.len(),
        opts.strategies.len(),
        opts.duration.as_secs(),
        opts.seed
    );
    let rows = compare::run(opts, &|r| {
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

/// The `edgeroute` binary of the same build: `target/<profile>/edgeroute` next to this one.
fn edgeroute_next_to_this_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe.with_file_name(format!("edgeroute{}", std::env::consts::EXE_SUFFIX));
    anyhow::ensure!(
        bin.exists(),
        "{} not found: build it first (`cargo build --release -p edgeroute`) or pass --edgeroute PATH",
        bin.display()
    );
    Ok(bin)
}
