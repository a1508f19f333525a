//! `edgeroute policy check FILE`: validates a routing policy document (`docs/policy.md`) and,
//! with `--discovery`, dry-runs it against a running replica's fleet (`POST
//! /v1/policy/check`, an admin token whose audience is the fleet) and prints what it would
//! change for sample requests. Exit status 1 when the document is refused.

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
}

/// Runs the command; `env` is the environment lookup (the token's fallback).
pub fn run(cmd: PolicyCommand, env: impl Fn(&str) -> Option<String>) -> Result<()> {
    let PolicyCommand::Check { file, discovery, token_file, ca_file, show } = cmd;
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
