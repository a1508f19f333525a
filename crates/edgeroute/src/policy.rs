//! `edgeroute policy check FILE`: validates a routing policy document (`docs/policy.md`) and,
//! with `--discovery`, dry-runs it against a running replica's fleet (`POST
//! /v1/policy/check`, an admin token whose audience is the fleet) and prints what it would
//! change for sample requests. Exit status 1 when the document is refused.
//!
//! `edgeroute policy push FILE --bus nats://…`: validates the document here (a bad one never
//! reaches the bus), puts it on the topology bus (`edgeroute_bus::policy`: only a bus user of
//! the admin role may, `edgeroute bus credentials --admin NAME`), and with `--wait-replicas N`
//! waits for N replicas following the bus (`[policy] source = "bus"`) to acknowledge it,
//! printing each one's result. Exit status 1 when a replica refused it or too few answered in
//! `--timeout-ms`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use http_body_util::{BodyExt, Full};

#[derive(Subcommand, Debug)]
pub enum PolicyCommand {
    /// Check a policy document: parse and validate it; with --discovery, dry-run it against a
    /// running replica's fleet and print the sample requests it would decide differently.
    Check {
        /// The policy document (TOML).
        file: PathBuf,
        /// A discovery replica's base URL (`https://disc:7070`).
        #[arg(long)]
        discovery: Option<String>,
        /// A file holding an admin token with the fleet audience (`edgeroute token mint
        /// --scope admin --fleet`); else `EDGEROUTE_TOKEN`.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// The fleet CA (PEM) for an https replica; default: the public roots.
        #[arg(long)]
        ca_file: Option<PathBuf>,
        /// Differences printed, at most.
        #[arg(long, default_value_t = 20)]
        show: usize,
    },
    /// Push a policy document to every discovery replica following the bus (`[policy] source
    /// = "bus"`): validated here first, put once on the bus, then applied (or refused, the
    /// previous policy kept) by each replica, which acknowledges it.
    Push(PushArgs),
}

/// `edgeroute policy push`'s arguments; the bus flags are the `[bus]` table's keys.
#[derive(clap::Args, Debug)]
pub struct PushArgs {
    /// The policy document (TOML).
    file: PathBuf,
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
    /// As the replicas' `[bus] policy_bucket`.
    #[arg(long, default_value = "edgeroute_policy")]
    policy_bucket: String,
    /// As the replicas' `[bus] policy_status_prefix`.
    #[arg(long, default_value = "edgeroute.policy.status")]
    policy_status_prefix: String,
    /// Wait for this many replicas to acknowledge the push (0: do not wait).
    #[arg(long, default_value_t = 0)]
    wait_replicas: usize,
    /// How long to wait for the bus and the acknowledgements, ms.
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
}

/// Runs the command; `env` is the environment lookup (the token's fallback).
pub fn run(cmd: PolicyCommand, env: impl Fn(&str) -> Option<String>) -> Result<()> {
    let (file, discovery, token_file, ca_file, show) = match cmd {
        PolicyCommand::Check { file, discovery, token_file, ca_file, show } => {
            (file, discovery, token_file, ca_file, show)
        }
        PolicyCommand::Push(args) => {
            let report = edgeroute_http::runtime(1)?.block_on(push(&args))?;
            print!("{}", report.text);
            if !report.ok {
                bail!(
                    "revision {} was not applied by every replica asked for (--wait-replicas)",
                    report.revision
                );
            }
            return Ok(());
        }
    };
    let text = crate::cli::read(&file)?;
    let policy = match edgeroute_policy::Policy::parse(&text) {
        Ok(p) => p,
        Err(e) => bail!("{}: refused: {e}", file.display()),
    };
    println!(
        "{}: valid — version `{}`, {} model(s), {} rule(s), {} pool(s)",
        file.display(),
        policy.version(),
        policy.registry().models().len(),
        policy.rule_ids().len(),
        policy.pools().len()
    );
    let Some(base) = discovery else { return Ok(()) };
    let token = match &token_file {
        Some(path) => edgeroute_proxy::read_token_file(path)?,
        None => env("EDGEROUTE_TOKEN")
            .filter(|t| !t.trim().is_empty())
            .context("give --token-file or EDGEROUTE_TOKEN: the check needs a fleet admin token")?,
    };
    let report = edgeroute_http::runtime(1)?.block_on(post(&base, &token, ca_file, text))?;
    print!("{}", render(&report, show));
    if report["valid"] == false {
        bail!("the replica refused the document");
    }
    Ok(())
}

async fn post(
    base: &str,
    token: &str,
    ca_file: Option<PathBuf>,
    text: String,
) -> Result<serde_json::Value> {
    let url = format!("{}/v1/policy/check", base.trim_end_matches('/'));
    let uri: http::Uri = url.parse().with_context(|| format!("`{url}` is not a URL"))?;
    let loopback = matches!(uri.host(), Some("127.0.0.1" | "localhost" | "[::1]" | "::1"));
    if uri.scheme_str() != Some("https") && !loopback {
        bail!("the admin token goes only over https (or to loopback): {url}");
    }
    let tls = edgeroute_http::client::tls_config(ca_file.as_deref()).map_err(anyhow::Error::msg)?;
    let client = edgeroute_http::client::https_client::<Full<bytes::Bytes>>(
        &edgeroute_http::client::ClientOptions::default(),
        tls,
    );
    let req = http::Request::post(uri)
        .header(http::header::AUTHORIZATION, format!("Bearer {}", token.trim()))
        .header(http::header::CONTENT_TYPE, "application/toml")
        .body(Full::new(bytes::Bytes::from(text)))?;
    let res = tokio::time::timeout(Duration::from_secs(30), client.request(req))
        .await
        .context("the replica did not answer within 30 s")?
        .with_context(|| format!("POST {url}"))?;
    let status = res.status();
    let body = res.into_body().collect().await.context("reading the answer")?.to_bytes();
    if !status.is_success() {
        bail!("POST {url}: {status}: {}", String::from_utf8_lossy(&body));
    }
    serde_json::from_slice(&body).context("the answer is not JSON")
}

/// What a push printed, and whether it met `--wait-replicas`.
#[derive(Debug)]
pub struct PushReport {
    pub revision: u64,
    pub text: String,
    pub ok: bool,
}

/// Validates the document, puts it on the bus and waits for the acknowledgements asked for.
pub async fn push(args: &PushArgs) -> Result<PushReport> {
    let text = crate::cli::read(&args.file)?;
    let policy = match edgeroute_policy::Policy::parse(&text) {
        Ok(p) => p,
        Err(e) => bail!("{}: refused, not pushed: {e}", args.file.display()),
    };
    let cfg = edgeroute_bus::BusConfig {
        nkey_seed_file: args.nkey_seed_file.clone(),
        creds_file: args.creds_file.clone(),
        tls_ca_file: args.tls_ca_file.clone(),
        require_tls: args.require_tls,
        policy_bucket: args.policy_bucket.clone(),
        policy_status_prefix: args.policy_status_prefix.clone(),
        op_timeout_ms: args.timeout_ms.clamp(1, 10_000),
        connect_timeout_ms: args.timeout_ms.clamp(1, 10_000),
        ..edgeroute_bus::BusConfig::nats(args.bus.clone())
    };
    let timeout = Duration::from_millis(args.timeout_ms);
    let bus = edgeroute_bus::Bus::connect(&cfg).await?;
    let deadline = tokio::time::Instant::now() + timeout;
    while !bus.is_connected() {
        if tokio::time::Instant::now() >= deadline {
            bail!("could not reach the bus at {} within {} ms", args.bus, args.timeout_ms);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Subscribed before the put, so no acknowledgement is missed.
    let mut acks = match args.wait_replicas {
        0 => None,
        _ => Some(bus.policy_statuses().await?),
    };
    let revision = bus
        .put_policy(&text)
        .await
        .context("putting the policy (the bus user must have the admin role)")?;
    let mut out = format!(
        "{}: version `{}` pushed as revision {revision}\n",
        args.file.display(),
        policy.version()
    );
    let mut ok = true;
    if let Some(acks) = &mut acks {
        let got = acks.collect(revision, args.wait_replicas, timeout).await;
        let (lines, all) = render_acks(&got, args.wait_replicas, args.timeout_ms);
        out.push_str(&lines);
        ok = all;
    }
    Ok(PushReport { revision, text: out, ok })
}

/// The replicas' acknowledgements as lines, and whether `wanted` of them applied it (pure).
fn render_acks(
    got: &[edgeroute_bus::PolicyStatus],
    wanted: usize,
    timeout_ms: u64,
) -> (String, bool) {
    use std::fmt::Write as _;
    let mut out = String::new();
    let mut applied = 0;
    for s in got {
        match s.result {
            edgeroute_bus::PolicyResult::Applied => {
                applied += 1;
                let _ = writeln!(out, "  {}: applied (in force: {})", s.replica, s.version);
            }
            edgeroute_bus::PolicyResult::Refused => {
                let _ = writeln!(
                    out,
                    "  {}: REFUSED, `{}` stays in force: {}",
                    s.replica,
                    if s.version.is_empty() { "no policy" } else { &s.version },
                    s.reason.as_deref().unwrap_or("no reason given")
                );
            }
        }
    }
    if got.len() < wanted {
        let _ =
            writeln!(out, "  {} of {wanted} replicas answered within {timeout_ms} ms", got.len());
    }
    (out, applied >= wanted)
}

/// The report as lines for a person (pure).
fn render(r: &serde_json::Value, show: usize) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if r["valid"] == false {
        let _ = writeln!(out, "refused by the replica: {}", r["error"].as_str().unwrap_or("?"));
        return out;
    }
    let text = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_owned();
    let _ = writeln!(
        out,
        "against the fleet ({} nodes; in force: {}):",
        r["nodes"],
        r["live_version"].as_str().unwrap_or("no policy")
    );
    for w in r["warnings"].as_array().into_iter().flatten() {
        let _ = writeln!(out, "  warning: {}", text(w));
    }
    let diffs = r["differences"].as_array().cloned().unwrap_or_default();
    let _ =
        writeln!(out, "  {} of {} sample requests decided differently", diffs.len(), r["samples"]);
    let side = |s: &serde_json::Value| {
        format!(
            "{} rule={} {}:{} tier={} node={}",
            text(&s["outcome"]),
            text(&s["rule"]),
            text(&s["model"]),
            text(&s["version"]),
            text(&s["tier"]),
            text(&s["node"])
        )
    };
    for d in diffs.iter().take(show) {
        let _ = writeln!(
            out,
            "  {} from {} ({}): {}  →  {}",
            text(&d["model"]),
            d["client_region"].as_str().unwrap_or("anywhere"),
            text(&d["session"]),
            side(&d["live"]),
            side(&d["candidate"])
        );
    }
    if diffs.len() > show {
        let _ = writeln!(out, "  … and {} more (--show N)", diffs.len() - show);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(replica: &str, result: edgeroute_bus::PolicyResult) -> edgeroute_bus::PolicyStatus {
        edgeroute_bus::PolicyStatus {
            replica: replica.into(),
            revision: 2,
            version: "p1".into(),
            result,
            reason: (result == edgeroute_bus::PolicyResult::Refused).then(|| "line 3".into()),
        }
    }

    #[test]
    fn acknowledgements_read_as_lines_and_a_refusal_or_a_silence_fails() {
        use edgeroute_bus::PolicyResult::{Applied, Refused};
        let (text, ok) = render_acks(&[status("a", Applied), status("b", Applied)], 2, 500);
        assert!(ok && text.contains("a: applied (in force: p1)"), "{text}");
        let (text, ok) = render_acks(&[status("a", Applied), status("b", Refused)], 2, 500);
        assert!(!ok && text.contains("b: REFUSED, `p1` stays in force: line 3"), "{text}");
        let (text, ok) = render_acks(&[status("a", Applied)], 3, 500);
        assert!(!ok && text.contains("1 of 3 replicas answered within 500 ms"), "{text}");
    }

    fn push_args(file: PathBuf, bus: String, wait: usize) -> PushArgs {
        PushArgs {
            file,
            bus,
            nkey_seed_file: None,
            creds_file: None,
            tls_ca_file: None,
            require_tls: false,
            policy_bucket: "edgeroute_policy".into(),
            policy_status_prefix: "edgeroute.policy.status".into(),
            wait_replicas: wait,
            timeout_ms: 3000,
        }
    }

    #[tokio::test]
    async fn a_bad_document_is_refused_before_the_bus_is_even_reached() {
        let dir = std::env::temp_dir().join(format!("edgeroute-push-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("p.toml");
        std::fs::write(&file, "version = \"p1\"\nbogus = 1\n").unwrap();
        // Nothing listens there: a push that got past validation would fail on the bus.
        let err = push(&push_args(file, "nats://127.0.0.1:1".into(), 1)).await.unwrap_err();
        assert!(err.to_string().contains("refused, not pushed"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_push_waits_for_the_replicas_and_fails_when_one_refuses() {
        let server = edgeroute_test_util::nats::NatsServer::start();
        let dir = std::env::temp_dir().join(format!("edgeroute-push-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("p.toml");
        std::fs::write(&file, "version = \"p1\"\n").unwrap();
        // Two stand-in replicas: one applies every text, one refuses every text.
        for (name, result) in [
            ("r1", edgeroute_bus::PolicyResult::Applied),
            ("r2", edgeroute_bus::PolicyResult::Refused),
        ] {
            let bus = edgeroute_bus::Bus::connect(&edgeroute_bus::BusConfig::nats(server.url()))
                .await
                .unwrap();
            tokio::spawn(async move {
                loop {
                    let Ok(mut w) = bus.watch_policy().await else {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    };
                    while let Some(u) = w.next().await {
                        let s = edgeroute_bus::PolicyStatus {
                            revision: u.revision,
                            ..status(name, result)
                        };
                        bus.publish_policy_status(&s).await.unwrap();
                    }
                }
            });
        }
        let one = push(&push_args(file.clone(), server.url(), 1)).await.unwrap();
        assert!(one.text.contains("version `p1` pushed as revision"), "{}", one.text);
        // Waiting for both: r2 refuses, the push fails and says who and why.
        let both = push(&push_args(file.clone(), server.url(), 2)).await.unwrap();
        assert!(!both.ok && both.text.contains("r2: REFUSED"), "{}", both.text);
        assert!(both.revision > one.revision);
        // More replicas than there are: fails after the timeout, saying how many answered.
        let mut three = push_args(file, server.url(), 3);
        three.timeout_ms = 500;
        let three = push(&three).await.unwrap();
        assert!(!three.ok && three.text.contains("2 of 3 replicas answered"), "{}", three.text);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_report_reads_as_lines() {
        let r = serde_json::json!({
            "valid": true, "version": "p2", "live_version": "p1", "nodes": 2,
            "warnings": ["NoJurisdiction { node: \"x\" }"], "samples": 120,
            "differences": [
                {"model": "llama", "client_region": "toronto", "session": "check-3",
                 "live": {"outcome": "Routed", "rule": "canary", "model": "llama", "version": "v1", "node": "a-1"},
                 "candidate": {"outcome": "Routed", "rule": "canary", "model": "llama", "version": "v2", "node": "b-1"}},
                {"model": "llama", "session": "check-4", "live": {}, "candidate": {}}
            ]
        });
        let text = render(&r, 1);
        assert!(text.contains("in force: p1"), "{text}");
        assert!(text.contains("2 of 120"), "{text}");
        assert!(
            text.contains("llama:v1") && text.contains("llama:v2") && text.contains("node=b-1")
        );
        assert!(text.contains("and 1 more"), "{text}");
        let refused = render(&serde_json::json!({"valid": false, "error": "line 1"}), 5);
        assert!(refused.contains("refused by the replica: line 1"));
    }
}
