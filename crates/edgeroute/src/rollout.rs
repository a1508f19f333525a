//! `edgeroute rollout`: moves a model from one version to the next region by region
//! (`crates/edgeroute-rollout`, docs in ARCHITECTURE.md).
//!
//! - `rollout start PLAN --policy BASE`: validates the plan and the policy it will build on,
//!   then drives the rollout to its end, printing each step; its state is on the bus (KV), so
//!   running the same command again after a stop resumes where it was.
//! - `rollout status MODEL`: the stored state (phase, each wave's share, the latest history).
//! - `rollout abort MODEL --reason TEXT`: asks the running driver to roll back its current wave.
//!
//! Who may: the bus user must have the admin role (`edgeroute bus credentials --admin NAME`),
//! the token the admin scope with the fleet audience (`edgeroute token mint --scope admin
//! --fleet`), the probes an inference token (`--inference-token-file`); nodes and replicas
//! cannot touch a rollout.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use edgeroute_rollout::driver::{Driver, DriverOptions, State, phase_name};
use edgeroute_rollout::http::{BusStore, HttpFleet, HttpFleetConfig, request_abort, state_key};
use edgeroute_rollout::{Phase, Plan};

#[derive(Subcommand, Debug)]
pub enum RolloutCommand {
    /// Start (or resume) the rollout a plan describes and drive it to its end.
    Start(StartArgs),
    /// The stored state of a model's rollout.
    Status {
        /// The model (the plan's `model`).
        model: String,
        #[command(flatten)]
        bus: BusArgs,
    },
    /// Ask the running driver to roll back its current wave and stop.
    Abort {
        model: String,
        /// Why (kept in the rollout's history).
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        bus: BusArgs,
    },
}

/// The topology bus, as `edgeroute policy push` takes it.
#[derive(clap::Args, Debug, Clone)]
pub struct BusArgs {
    /// The NATS server of the topology bus (`nats://host:4222`, or `tls://…`).
    #[arg(long = "bus")]
    bus: String,
    /// An admin bus user's NKey seed file (`edgeroute bus credentials --admin NAME`).
    #[arg(long)]
    nkey_seed_file: Option<PathBuf>,
    /// A `.creds` file instead of `--nkey-seed-file`.
    #[arg(long, conflicts_with = "nkey_seed_file")]
    creds_file: Option<PathBuf>,
    /// The CA (PEM) that signs the NATS server's certificate.
    #[arg(long)]
    tls_ca_file: Option<PathBuf>,
    /// Refuse to talk to the server without TLS.
    #[arg(long)]
    require_tls: bool,
    /// How long to wait for the bus, ms.
    #[arg(long, default_value_t = 10_000)]
    bus_timeout_ms: u64,
}

#[derive(clap::Args, Debug)]
pub struct StartArgs {
    /// The rollout plan (TOML; see `crates/edgeroute-rollout/src/plan.rs`).
    plan: PathBuf,
    /// The operator's routing policy the rollout's rules are added to (its registry must list
    /// both versions). Not needed to resume.
    #[arg(long)]
    policy: Option<PathBuf>,
    /// A discovery replica (`https://disc:7070`): the fleet's topology.
    #[arg(long)]
    discovery: String,
    /// A file holding a fleet admin token (`edgeroute token mint --scope admin --fleet`);
    /// else `EDGEROUTE_TOKEN`.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// A file holding an inference token the correctness probes ask the nodes with; default:
    /// the admin token.
    #[arg(long)]
    inference_token_file: Option<PathBuf>,
    /// The fleet CA (PEM) for https nodes and discovery.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Discovery replicas following the bus that must apply each policy document.
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// Figures, probes and abort requests are looked at this often, ms.
    #[arg(long, default_value_t = 5_000)]
    poll_ms: u64,
    /// A load or an unload on one node may take this long, s.
    #[arg(long, default_value_t = 600)]
    node_timeout_s: u64,
    /// The nodes' admin port, when their admin routes listen apart (`admin.listen`).
    #[arg(long)]
    admin_port: Option<u16>,
    #[command(flatten)]
    bus: BusArgs,
}

async fn connect(args: &BusArgs) -> Result<edgeroute_bus::Bus> {
    let cfg = edgeroute_bus::BusConfig {
        nkey_seed_file: args.nkey_seed_file.clone(),
        creds_file: args.creds_file.clone(),
        tls_ca_file: args.tls_ca_file.clone(),
        require_tls: args.require_tls,
        op_timeout_ms: args.bus_timeout_ms.clamp(1, 10_000),
        connect_timeout_ms: args.bus_timeout_ms.clamp(1, 10_000),
        ..edgeroute_bus::BusConfig::nats(args.bus.clone())
    };
    let bus = edgeroute_bus::Bus::connect(&cfg).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(args.bus_timeout_ms);
    while !bus.is_connected() {
        if tokio::time::Instant::now() >= deadline {
            bail!("could not reach the bus at {} within {} ms", args.bus, args.bus_timeout_ms);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(bus)
}

/// Runs the command; `env` is the environment lookup (the token's fallback).
pub fn run(cmd: RolloutCommand, env: impl Fn(&str) -> Option<String>) -> Result<()> {
    let rt = edgeroute_http::runtime(1)?;
    match cmd {
        RolloutCommand::Status { model, bus } => rt.block_on(async {
            let bus = connect(&bus).await?;
            let Some((_, bytes)) = bus.rollout_get(&state_key(&model)).await? else {
                bail!("no rollout of `{model}` on this bus");
            };
            let state: State =
                serde_json::from_slice(&bytes).context("the stored rollout state is unreadable")?;
            print!("{}", state.summary());
            Ok(())
        }),
        RolloutCommand::Abort { model, reason, bus } => rt.block_on(async {
            let bus = connect(&bus).await?;
            if bus.rollout_get(&state_key(&model)).await?.is_none() {
                bail!("no rollout of `{model}` on this bus");
            }
            request_abort(&bus, &model, &reason).await?;
            println!(
                "abort of `{model}`'s rollout requested; the driver rolls back at its next poll"
            );
            Ok(())
        }),
        RolloutCommand::Start(args) => {
            let token = match &args.token_file {
                Some(path) => edgeroute_proxy::read_token_file(path)?,
                None => env("EDGEROUTE_TOKEN")
                    .filter(|t| !t.trim().is_empty())
                    .context("give --token-file or EDGEROUTE_TOKEN: a fleet admin token")?,
            };
            let state = rt.block_on(start(&args, token))?;
            match state.machine.phase() {
                Phase::Finished => Ok(()),
                other => bail!(
                    "the rollout did not finish: {}",
                    match other {
                        Phase::RolledBack { reason } => format!("rolled back: {reason}"),
                        _ => phase_name(&state.machine),
                    }
                ),
            }
        }
    }
}

async fn start(args: &StartArgs, token: String) -> Result<State> {
    let plan_text = crate::cli::read(&args.plan)?;
    let plan =
        Plan::from_toml(&plan_text).map_err(|e| anyhow::anyhow!("{}: {e}", args.plan.display()))?;
    let fresh = match &args.policy {
        Some(path) => {
            let base = crate::cli::read(path)?;
            // Refused now rather than at the first step: the document the rollout would push.
            edgeroute_rollout::driver::compose_policy(&base, &plan, &Default::default(), 0, false)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            Some(State::new(plan.clone(), base))
        }
        None => None,
    };
    let bus = connect(&args.bus).await?;
    let fleet = HttpFleet::new(
        HttpFleetConfig {
            discovery: args.discovery.clone(),
            token,
            inference_token: match &args.inference_token_file {
                Some(path) => Some(edgeroute_proxy::read_token_file(path)?),
                None => None,
            },
            ca_file: args.ca_file.clone(),
            replicas: args.replicas,
            push_timeout: Duration::from_secs(30),
            admin_port: args.admin_port,
            check_every: Duration::from_millis(250),
        },
        bus.clone(),
    )
    .map_err(anyhow::Error::msg)?;
    let store = BusStore { bus, model: plan.model.clone() };
    let opts = DriverOptions {
        poll: Duration::from_millis(args.poll_ms.max(100)),
        node_timeout: Duration::from_secs(args.node_timeout_s.max(1)),
    };
    let mut driver = match Driver::open(fleet, store, fresh.clone(), opts).await {
        Ok(d) => d,
        Err(e) if fresh.is_none() => bail!("{e} (give --policy to start a new rollout)"),
        Err(e) => return Err(e.into()),
    };
    // A rollout of this model that ended before: a new plan starts afresh.
    if let Some(f) = fresh {
        driver.replace_finished(f);
    }
    println!("{}", driver.state().summary().lines().next().unwrap_or_default());
    let state = driver
        .run(edgeroute_core::clock::unix_ms, &mut |e| {
            println!("[{}] {}", fmt_time(e.at_ms), e.text)
        })
        .await?;
    print!("{}", state.summary());
    Ok(state)
}

/// Unix ms as `HH:MM:SS` (UTC).
fn fmt_time(ms: u64) -> String {
    let s = ms / 1000;
    format!("{:02}:{:02}:{:02}", (s / 3600) % 24, (s / 60) % 60, s % 60)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

    use super::*;

    fn bus_args(url: String) -> BusArgs {
        BusArgs {
            bus: url,
            nkey_seed_file: None,
            creds_file: None,
            tls_ca_file: None,
            require_tls: false,
            bus_timeout_ms: 2_000,
        }
    }

    fn start_args(dir: &std::path::Path, bus: String) -> StartArgs {
        StartArgs {
            plan: dir.join("plan.toml"),
            policy: Some(dir.join("policy.toml")),
            discovery: "http://127.0.0.1:1".into(),
            token_file: None,
            inference_token_file: None,
            ca_file: None,
            replicas: 1,
            poll_ms: 100,
            node_timeout_s: 1,
            admin_port: None,
            bus: bus_args(bus),
        }
    }

    const PLAN: &str = "model = \"llama\"\nfrom = \"v1\"\nto = \"v2\"\n\
                        waves = [[\"tor\"], [\"mtl\"], [\"van\"]]\n\
                        load = { v2 = { path = \"/m/llama-v2\" } }\n";
    const POLICY: &str = "version = \"p1\"\n[[models]]\nname = \"llama\"\n\
                          [[models.versions]]\nid = \"v1\"\n[[models.versions]]\nid = \"v2\"\n";

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir()
            .join(format!("edgeroute-rollout-cli-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[tokio::test]
    async fn a_bad_plan_or_a_policy_without_the_version_is_refused_before_the_bus() {
        let d = dir("bad");
        // Nothing listens at the bus: refusals must come before it is reached.
        let bus = "nats://127.0.0.1:1".to_owned();
        std::fs::write(d.join("plan.toml"), PLAN.replace("[\"mtl\"], ", "")).unwrap();
        std::fs::write(d.join("policy.toml"), POLICY).unwrap();
        let e = start(&start_args(&d, bus.clone()), "t".into()).await.unwrap_err().to_string();
        assert!(e.contains("`waves`") && e.contains("must stay on `v1`"), "{e}");
        std::fs::write(d.join("plan.toml"), PLAN).unwrap();
        std::fs::write(d.join("policy.toml"), POLICY.replace("id = \"v2\"", "id = \"v3\""))
            .unwrap();
        let e = start(&start_args(&d, bus), "t".into()).await.unwrap_err().to_string();
        assert!(e.contains("policy.toml") && e.contains("v2"), "{e}");
        std::fs::remove_dir_all(d).unwrap();
    }

    #[tokio::test]
    async fn status_and_abort_read_and_write_the_state_on_the_bus() {
        let server = edgeroute_test_util::nats::NatsServer::start();
        let args = bus_args(server.url());
        let bus = connect(&args).await.unwrap();
        // Nothing stored: both say so.
        assert!(bus.rollout_get(&state_key("llama")).await.unwrap().is_none());
        // A driver's state as it would be stored, then an abort request for it.
        let state = State::new(Plan::from_toml(PLAN).unwrap(), POLICY.into());
        let bytes = serde_json::to_vec(&state).unwrap();
        bus.rollout_put(&state_key("llama"), &bytes, None).await.unwrap();
        let r1 = request_abort(&bus, "llama", "operator said so").await.unwrap();
        let r2 = request_abort(&bus, "llama", "again").await.unwrap();
        assert!(r2 > r1, "the last request stands");
        let store = BusStore { bus: bus.clone(), model: "llama".into() };
        use edgeroute_rollout::driver::StateStore as _;
        assert_eq!(store.abort_requested().await, Some((r2, "again".into())));
        assert!(state.summary().contains("rollout of llama v1 → v2: not started"));
        // The command's own paths, over a fresh connection each (as a person runs them).
        let url = server.url();
        let out = tokio::task::spawn_blocking(move || {
            let status =
                RolloutCommand::Status { model: "llama".into(), bus: bus_args(url.clone()) };
            let ok = run(status, |_| None).is_ok();
            let missing = RolloutCommand::Status { model: "other".into(), bus: bus_args(url) };
            (ok, run(missing, |_| None).unwrap_err().to_string())
        })
        .await
        .unwrap();
        assert!(out.0);
        assert!(out.1.contains("no rollout of `other`"), "{}", out.1);
    }
}
