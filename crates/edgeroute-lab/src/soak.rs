//! `edgeroute-lab bench soak`: a real `edgeroute node` process (the simulator in process, JWT
//! on) under mixed JSON and SSE traffic from a well-behaved tenant, open-loop, beside a share
//! of hostile requests — bodies trickled a byte at a time, declared oversize bodies, prompts
//! beyond the model's context, bad tokens, streams abandoned after their first token — for a
//! bounded time. The node's RSS and open file descriptors are sampled every second.
//!
//! What it shows: the well-behaved tenant sees no error, every hostile request gets its
//! precise refusal (408, 413, 400, 401) or is cut, and memory and descriptors stay flat.
//! Every loop stops at the deadline; all traffic is on loopback.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::fleet::{FleetBackend, FleetSpec};
use crate::gateway_bench::{mint_token, mint_token_for, start_server};
use crate::loadgen::{self, LoadReport, LoadSpec, Mode};
use crate::process::{ProcessGuard, rss};

/// The soak's size.
#[derive(Debug, Clone)]
pub struct SoakOpts {
    /// The `edgeroute` binary.
    pub bin: PathBuf,
    /// Measured time (after a short warm-up).
    pub duration: Duration,
    /// Well-behaved requests per second, half JSON, half SSE.
    pub rate: f64,
    /// Hostile requests per second, spread evenly over the five kinds.
    pub hostile_rate: f64,
    /// The node's body deadline (`limits.body_read_timeout_ms`): trickled bodies are cut
    /// after it.
    pub body_timeout: Duration,
    /// Where the node's config and log go.
    pub dir: PathBuf,
    /// The command that reproduces the run, for the report.
    pub command: String,
}

impl SoakOpts {
    pub fn new(bin: impl Into<PathBuf>) -> SoakOpts {
        SoakOpts {
            bin: bin.into(),
            duration: Duration::from_secs(120),
            rate: 200.0,
            hostile_rate: 50.0,
            body_timeout: Duration::from_secs(2),
            dir: std::env::temp_dir().join(format!("edgeroute-soak-{}", std::process::id())),
            command: String::new(),
        }
    }
}

/// The hostile kinds, with the answer each must get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Hostile {
    /// A body declared just under 4 MiB, sent a byte every 200 ms: 408 at the body deadline,
    /// or 503 at once when the tenant's share of the node's body budget is spent.
    SlowBody,
    /// `Content-Length: 5000000` (over the 4 MiB limit): 413 before a byte is read.
    Oversized,
    /// A prompt of 100,000 words with `max_tokens` 8000: 400 `context_length_exceeded`
    /// (or 503, see [`Hostile::expected`]).
    BeyondContext,
    /// A bearer token that is not a JWT: 401.
    BadToken,
    /// A stream read to its first token, then the connection dropped: 200, then nothing (or
    /// 503, see [`Hostile::expected`]).
    Abandoned,
}

impl Hostile {
    pub const ALL: [Hostile; 5] = [
        Hostile::SlowBody,
        Hostile::Oversized,
        Hostile::BeyondContext,
        Hostile::BadToken,
        Hostile::Abandoned,
    ];

    /// The answers this kind must get. Requests whose body would be read also get 503 at
    /// once while the attacker's slow bodies hold its tenant's share of the node's body
    /// budget: the refusal lands on the tenant that caused it.
    pub fn expected(self) -> &'static [u16] {
        match self {
            Hostile::SlowBody => &[408, 503],
            Hostile::Oversized => &[413],
            Hostile::BeyondContext => &[400, 503],
            Hostile::BadToken => &[401],
            Hostile::Abandoned => &[200, 503],
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Hostile::SlowBody => "4 MiB body trickled a byte per 200 ms",
            Hostile::Oversized => "Content-Length 5,000,000",
            Hostile::BeyondContext => "prompt beyond the context window",
            Hostile::BadToken => "bad bearer token",
            Hostile::Abandoned => "stream abandoned after its first token",
        }
    }
}

/// One sample of the node process.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub at_s: f64,
    pub rss_bytes: u64,
    pub fds: usize,
}

/// What a soak saw.
#[derive(Debug)]
pub struct SoakReport {
    pub opts: SoakOpts,
    pub json: LoadReport,
    pub stream: LoadReport,
    /// Per hostile kind: statuses seen (0: no status, the connection ended first).
    pub hostile: BTreeMap<Hostile, BTreeMap<u16, u64>>,
    pub samples: Vec<Sample>,
    /// `edgeroute_node_rejected_total` lines from the node's `/metrics` at the end.
    pub rejected: Vec<String>,
}

impl SoakReport {
    /// Errors the well-behaved tenant saw.
    pub fn legit_errors(&self) -> u64 {
        self.json.errors.total() + self.stream.errors.total()
    }

    /// Hostile requests that did not get their expected answer.
    pub fn hostile_unexpected(&self) -> u64 {
        self.hostile
            .iter()
            .map(|(k, seen)| {
                seen.iter().filter(|(s, _)| !k.expected().contains(s)).map(|(_, n)| n).sum::<u64>()
            })
            .sum()
    }

    /// Median of the samples in `[from, to)` (fractions of the run) by `f`.
    fn median(&self, from: f64, to: f64, f: impl Fn(&Sample) -> u64) -> Option<u64> {
        let n = self.samples.len();
        let (a, b) = ((n as f64 * from) as usize, ((n as f64 * to) as usize).max(1).min(n));
        let mut v: Vec<u64> = self.samples.get(a..b)?.iter().map(f).collect();
        v.sort_unstable();
        v.get(v.len() / 2).copied()
    }

    /// (early, late, max) RSS: medians of the second and last fifths of the run, and the
    /// highest sample.
    pub fn rss(&self) -> Option<(u64, u64, u64)> {
        Some((
            self.median(0.2, 0.4, |s| s.rss_bytes)?,
            self.median(0.8, 1.0, |s| s.rss_bytes)?,
            self.samples.iter().map(|s| s.rss_bytes).max()?,
        ))
    }

    /// (early, late, max) open descriptors, as [`SoakReport::rss`].
    pub fn fds(&self) -> Option<(u64, u64, u64)> {
        Some((
            self.median(0.2, 0.4, |s| s.fds as u64)?,
            self.median(0.8, 1.0, |s| s.fds as u64)?,
            self.samples.iter().map(|s| s.fds as u64).max()?,
        ))
    }

    /// Flat: the late median RSS within 10 % + 8 MiB of the early one, descriptors within
    /// 10 % + 16.
    pub fn flat(&self) -> bool {
        let (Some((r0, r1, _)), Some((f0, f1, _))) = (self.rss(), self.fds()) else {
            return false;
        };
        r1 <= r0 + r0 / 10 + 8 * 1024 * 1024 && f1 <= f0 + f0 / 10 + 16
    }

    pub fn to_markdown(&self) -> String {
        let mib = |b: u64| format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0));
        let mut md = String::new();
        let _ = writeln!(
            md,
            "Soak: `edgeroute node` (simulator in process, JWT on) for {} s; well-behaved {} req/s (half JSON, half SSE, one tenant) and hostile {} req/s. Reproduce: `{}`\n",
            self.opts.duration.as_secs(),
            self.opts.rate,
            self.opts.hostile_rate,
            self.opts.command
        );
        md.push_str(
            "| well-behaved | sent | ok | errors | p50 | p99 |\n|---|---:|---:|---:|---:|---:|\n",
        );
        for r in [&self.json, &self.stream] {
            let p = r.latency_percentiles();
            let _ = writeln!(
                md,
                "| {:?} | {} | {} | {} | {:.2} ms | {:.2} ms |",
                r.mode,
                r.scheduled,
                r.ok,
                r.errors.total(),
                p.p50 as f64 / 1e3,
                p.p99 as f64 / 1e3
            );
        }
        md.push_str("\n| hostile | sent | answered as expected | other |\n|---|---:|---:|---|\n");
        for (k, seen) in &self.hostile {
            let total: u64 = seen.values().sum();
            let ok: u64 =
                seen.iter().filter(|(s, _)| k.expected().contains(s)).map(|(_, n)| n).sum();
            let expected: Vec<String> = seen
                .iter()
                .filter(|(s, _)| k.expected().contains(s))
                .map(|(s, n)| format!("{s}×{n}"))
                .collect();
            let other: Vec<String> = seen
                .iter()
                .filter(|(s, _)| !k.expected().contains(s))
                .map(|(s, n)| if *s == 0 { format!("no answer×{n}") } else { format!("{s}×{n}") })
                .collect();
            let _ = writeln!(
                md,
                "| {} | {total} | {ok} ({}) | {} |",
                k.label(),
                expected.join(", "),
                if other.is_empty() { "—".into() } else { other.join(", ") }
            );
        }
        if let (Some((r0, r1, rmax)), Some((f0, f1, fmax))) = (self.rss(), self.fds()) {
            let _ = writeln!(
                md,
                "\n| node process | early (2nd fifth, median) | late (last fifth, median) | max |\n|---|---:|---:|---:|\n| RSS | {} | {} | {} |\n| open descriptors | {f0} | {f1} | {fmax} |\n",
                mib(r0),
                mib(r1),
                mib(rmax)
            );
        }
        let _ = writeln!(
            md,
            "Verdict: well-behaved errors {}, hostile answered otherwise {}, memory and descriptors {}.",
            self.legit_errors(),
            self.hostile_unexpected(),
            if self.flat() { "flat" } else { "**growing**" }
        );
        if !self.rejected.is_empty() {
            let _ = writeln!(
                md,
                "\nThe node's own count (`/metrics`):\n\n```\n{}\n```",
                self.rejected.join("\n")
            );
        }
        md
    }
}

/// The node's config: the simulator quick (5 ms to first token, 16-token answers) with room
/// for the load, limits out of the well-behaved tenant's way, the body deadline short.
fn node_config(listen: SocketAddr, secret: &Path, body_timeout: Duration) -> Result<String> {
    let backend =
        FleetBackend::Sim { tokens_per_s: 2000.0, prefill_us_per_token: 0, spare_gpu: false };
    let mut cfg = FleetSpec::single("soak-1", 5, secret, backend).node_config(0, None);
    cfg.node.listen = listen;
    cfg.limits.max_concurrency = 1024;
    cfg.limits.body_read_timeout_ms = u64::try_from(body_timeout.as_millis()).unwrap_or(u64::MAX);
    if let edgeroute_node::config::BackendConfig::Sim { sim } = &mut cfg.backend {
        (sim.min_answer_tokens, sim.max_answer_tokens, sim.max_queue) = (8, 16, 1024);
        for g in &mut sim.gpus {
            g.slots = 256;
        }
    }
    toml::to_string(&cfg).context("writing the node's config")
}

/// Runs the soak.
pub async fn run(opts: SoakOpts) -> Result<SoakReport> {
    std::fs::create_dir_all(&opts.dir)?;
    let secret = opts.dir.join("hs256.secret");
    let raw: [u8; 32] = rand::random();
    std::fs::write(&secret, raw.iter().map(|b| format!("{b:02x}")).collect::<String>())?;
    let mut guard = ProcessGuard::new();
    let config_path = opts.dir.join("node.toml");
    let (addr, pid) = start_server(
        &mut guard,
        "node",
        &opts.dir.join("node.log"),
        "/health",
        Duration::from_secs(30),
        |addr| {
            std::fs::write(&config_path, node_config(addr, &secret, opts.body_timeout)?)?;
            let mut c = Command::new(&opts.bin);
            c.arg("node").arg("--config").arg(&config_path);
            Ok(c)
        },
    )
    .await?;
    let token = mint_token(&opts.bin, &secret).await?;
    // The hostile requests come from a tenant of their own, as an attacker with one stolen
    // or paid-for token would: the well-behaved tenant must not notice it.
    let attacker = mint_token_for(&opts.bin, &secret, "attacker").await?;
    let warmup = Duration::from_secs(2);
    let started = Instant::now();
    let deadline = started + warmup + opts.duration;

    let samples = Arc::new(Mutex::new(Vec::new()));
    let sampler = tokio::spawn({
        let samples = samples.clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            while Instant::now() < deadline {
                tick.tick().await;
                if let Some(rss_bytes) = rss(pid) {
                    let fds =
                        std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count);
                    let at_s = started.elapsed().as_secs_f64();
                    if let Ok(mut s) = samples.lock() {
                        s.push(Sample { at_s, rss_bytes, fds });
                    }
                }
            }
        }
    });

    let legit = |mode: Mode| -> Result<LoadSpec> {
        let body = loadgen::chat_body("sim-llama", "How far is Montreal from Toronto?", 16, mode)?;
        let mut spec = LoadSpec::new(format!("http://{addr}"), body, mode, opts.rate / 2.0);
        spec.bearer = Some(token.clone());
        spec.duration = opts.duration;
        spec.warmup = warmup;
        spec.connections = 64;
        Ok(spec)
    };
    let (json_spec, stream_spec) = (legit(Mode::Json)?, legit(Mode::Stream)?);
    let hostile = Arc::new(Mutex::new(BTreeMap::<Hostile, BTreeMap<u16, u64>>::new()));
    let per_kind = opts.hostile_rate / Hostile::ALL.len() as f64;
    let attackers: Vec<_> = Hostile::ALL
        .into_iter()
        .filter(|_| per_kind > 0.0)
        .map(|kind| {
            let (hostile, token) = (hostile.clone(), attacker.clone());
            tokio::spawn(attack(kind, addr, token, per_kind, deadline, hostile))
        })
        .collect();
    let (json, stream) = tokio::join!(loadgen::run(&json_spec), loadgen::run(&stream_spec));
    for a in attackers {
        let _ = a.await;
    }
    let _ = sampler.await;
    let rejected = metrics_lines(addr, "edgeroute_node_rejected_total").await;
    guard.stop_all();
    let hostile = hostile.lock().map(|h| h.clone()).unwrap_or_default();
    let samples = samples.lock().map(|s| s.clone()).unwrap_or_default();
    Ok(SoakReport { opts, json: json?, stream: stream?, hostile, samples, rejected })
}

/// Sends `kind` at `rate` until `deadline`; each attempt on a task of its own (at most 512
/// at once: a server that stopped answering cannot make the soak grow), its outcome counted.
async fn attack(
    kind: Hostile,
    addr: SocketAddr,
    token: String,
    rate: f64,
    deadline: Instant,
    seen: Arc<Mutex<BTreeMap<Hostile, BTreeMap<u16, u64>>>>,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(512));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    let mut tasks = tokio::task::JoinSet::new();
    while Instant::now() < deadline {
        tick.tick().await;
        let Ok(permit) = permits.clone().try_acquire_owned() else { continue };
        let (token, seen) = (token.clone(), seen.clone());
        tasks.spawn(async move {
            let _permit = permit;
            let status =
                tokio::time::timeout(Duration::from_secs(30), one(kind, addr, &token)).await;
            let status = status.unwrap_or(0);
            if let Ok(mut s) = seen.lock() {
                *s.entry(kind).or_default().entry(status).or_default() += 1;
            }
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
}

/// One hostile request; the status it got (0: none).
async fn one(kind: Hostile, addr: SocketAddr, token: &str) -> u16 {
    let Ok(mut s) = TcpStream::connect(addr).await else { return 0 };
    let head = |auth: &str, len: usize| {
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: soak\r\nAuthorization: Bearer {auth}\r\nContent-Type: application/json\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
        )
    };
    let small = r#"{"model":"sim-llama","messages":[{"role":"user","content":"hi"}],"max_tokens":8,"stream":true}"#;
    let sent = match kind {
        Hostile::SlowBody => {
            if s.write_all(head(token, 4 * 1024 * 1024 - 1).as_bytes()).await.is_err()
                || s.write_all(b"{\"model\":").await.is_err()
            {
                return 0;
            }
            // Trickle until the server answers (its 408) or closes.
            let mut buf = [0u8; 512];
            let mut answer = Vec::new();
            loop {
                tokio::select! {
                    r = s.read(&mut buf) => match r {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            answer.extend_from_slice(&buf[..n]);
                            if answer.windows(2).any(|w| w == b"\r\n") {
                                break;
                            }
                        }
                    },
                    () = tokio::time::sleep(Duration::from_millis(200)) => {
                        if s.write_all(b" ").await.is_err() {
                            break;
                        }
                    }
                }
            }
            return status_of(&answer);
        }
        Hostile::Oversized => s.write_all(head(token, 5_000_000).as_bytes()).await,
        Hostile::BeyondContext => {
            let body = format!(
                r#"{{"model":"sim-llama","messages":[{{"role":"user","content":"{}"}}],"max_tokens":8000}}"#,
                "word ".repeat(100_000)
            );
            let mut req = head(token, body.len()).into_bytes();
            req.extend_from_slice(body.as_bytes());
            s.write_all(&req).await
        }
        Hostile::BadToken => {
            let mut req = head("not.a.jwt", small.len()).into_bytes();
            req.extend_from_slice(small.as_bytes());
            s.write_all(&req).await
        }
        Hostile::Abandoned => {
            let mut req = head(token, small.len()).into_bytes();
            req.extend_from_slice(small.as_bytes());
            if s.write_all(&req).await.is_err() {
                return 0;
            }
            // Up to the first token, then gone.
            return status_of(&read_until(&mut s, b"data:").await);
        }
    };
    if sent.is_err() {
        return 0;
    }
    status_of(&read_until(&mut s, b"\r\n").await)
}

/// Reads until `marker` has arrived or the connection ends.
async fn read_until(s: &mut TcpStream, marker: &[u8]) -> Vec<u8> {
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !answer.windows(marker.len()).any(|w| w == marker) {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
        }
    }
    answer
}

/// The status of `HTTP/1.1 NNN ...`, or 0.
fn status_of(answer: &[u8]) -> u16 {
    answer
        .get(9..12)
        .and_then(|s| std::str::from_utf8(s).ok())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// The lines of the node's `/metrics` that start with `prefix`.
async fn metrics_lines(addr: SocketAddr, prefix: &str) -> Vec<String> {
    let Ok(mut s) = TcpStream::connect(addr).await else { return vec![] };
    let req = "GET /metrics HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n";
    if s.write_all(req.as_bytes()).await.is_err() {
        return vec![];
    }
    let mut text = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut text)).await;
    text.lines().filter(|l| l.starts_with(prefix)).map(str::to_owned).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_read_from_the_status_line() {
        assert_eq!(status_of(b"HTTP/1.1 408 Request Timeout\r\n"), 408);
        assert_eq!(status_of(b""), 0);
        assert_eq!(status_of(b"HTTP/1.1 xyz"), 0);
    }

    #[test]
    fn the_node_config_is_one_the_node_accepts() {
        let text = node_config(
            "127.0.0.1:9".parse().unwrap_or_else(|_| unreachable!()),
            Path::new("/s"),
            Duration::from_secs(2),
        );
        let cfg = edgeroute_node::NodeConfig::parse(&text.unwrap_or_default(), |_| None);
        assert!(cfg.is_ok_and(|c| c.limits.body_read_timeout_ms == 2000));
    }
}
