//! `edgeroute`: the thin command-line front of the workspace. Each command parses its
//! arguments and config ([`cli`]), builds its runtime, binds its listener, and hands both to
//! its crate's `serve` until Ctrl-C or SIGTERM; no logic lives here. The demo and the
//! benchmarks are the lab's binary (`edgeroute-lab`), which this one does not link.

mod bus;
mod cli;
mod policy;
mod rollout;
mod token;

/// Request handling allocates many small, short-lived buffers; mimalloc serves them with less
/// CPU than glibc's allocator (measured: see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::future::Future;
use std::net::SocketAddr;

use anyhow::{Context, Result};
use clap::Parser;
use tokio::net::TcpListener;

use crate::cli::{Cli, Command};

fn main() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("EDGEROUTE_LOG")
                .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal: log files (node.log) stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        Command::Node { config } => {
            // The node's config picks its runtime's shape, so it is read first.
            let cfg = cli::node_config(&config)?;
            let name = format!("edgeroute node `{}`", cfg.node.id);
            serve(cfg.node.worker_threads, cfg.node.listen, &name, |listener| {
                edgeroute_node::serve(cfg, listener, edgeroute_http::shutdown_signal())
            })
        }
        Command::Discovery(args) => {
            let cfg = args.config()?;
            serve(cfg.discovery.worker_threads, cfg.discovery.listen, "edgeroute discovery", |l| {
                edgeroute_discovery::serve(cfg, l, edgeroute_http::shutdown_signal())
            })
        }
        Command::Proxy(args) => {
            let listen = args.listen;
            let (client, proxy) = args.config()?;
            serve(0, listen, "edgeroute proxy", |listener| {
                edgeroute_proxy::serve(client, proxy, listener, edgeroute_http::shutdown_signal())
            })
        }
        Command::Router { config } => {
            let cfg = cli::router_config(&config)?;
            let listen = cfg.router.listen;
            serve(0, listen, "edgeroute router", |listener| {
                edgeroute_router::serve(cfg, listener, edgeroute_http::shutdown_signal())
            })
        }
        Command::Dns { config, listen, threads } => {
            let cfg = cli::dns_config(&config)?;
            edgeroute_http::runtime(threads)?.block_on(async {
                let running =
                    edgeroute_dns::start(cfg, listen).await.map_err(anyhow::Error::msg)?;
                eprintln!("edgeroute dns listening on {} (UDP and TCP)", running.addr);
                edgeroute_http::shutdown_signal().await;
                Ok(())
            })
        }
        Command::Sim(args) => {
            let cfg = args.config()?;
            serve(0, args.listen, "edgeroute sim", |listener| {
                edgeroute_sim::serve(cfg, listener, edgeroute_http::shutdown_signal())
            })
        }
        Command::Watch(args) => edgeroute_http::runtime(0)?.block_on(async {
            let installed =
                edgeroute_node::watcher::run(args.config()?, edgeroute_http::shutdown_signal())
                    .await?;
            eprintln!("edgeroute watch: installed {} model(s)", installed.len());
            Ok(())
        }),
        Command::Model { command } => command.run(),
        Command::Token { command } => token::run(command),
        Command::Policy { command } => policy::run(command, cli::env),
        Command::Rollout { command } => rollout::run(command, cli::env),
        Command::Bus { command } => bus::run(command),
    }
}

/// Builds a runtime of `threads` workers, binds `addr`, says so on stderr, and runs `serve` on
/// the listener until it returns (its shutdown is [`edgeroute_http::shutdown_signal`]).
fn serve<F, E>(
    threads: usize,
    addr: SocketAddr,
    name: &str,
    serve: impl FnOnce(TcpListener) -> F,
) -> Result<()>
where
    F: Future<Output = Result<(), E>>,
    E: std::error::Error + Send + Sync + 'static,
{
    edgeroute_http::runtime(threads)?.block_on(async {
        let listener = TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
        eprintln!("{name} listening on {}", listener.local_addr()?);
        Ok(serve(listener).await?)
    })
}
