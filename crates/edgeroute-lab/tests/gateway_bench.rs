//! The benchmark's orchestration end to end, against `fake-edgeroute` (a stand-in with the
//! real binary's command line), nginx when it is installed, and LiteLLM's proxy when
//! `scripts/setup-litellm.sh` has installed it (never downloaded by the tests). Figures are not
//! asserted: only that every target was started, loaded, reported and stopped.

// Helpers outside #[test] bodies unwrap too: clippy.toml's allow-unwrap-in-tests only
// covers the test functions themselves, and a panic here is still a failed test.
#![allow(clippy::unwrap_used)]

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use edgeroute_lab::gateway_bench::{self, Endpoint, GatewayBenchOpts, TargetKind};
use edgeroute_lab::loadgen::Mode;

const FAKE: &str = env!("CARGO_BIN_EXE_fake-edgeroute");

fn small_opts(bin: &Path) -> GatewayBenchOpts {
    let mut opts = GatewayBenchOpts::new(bin);
    opts.rates = vec![200.0];
    opts.modes = vec![Mode::Json, Mode::Stream];
    opts.duration = Duration::from_millis(600);
    opts.warmup = Duration::from_millis(200);
    opts.rounds = 2;
    opts.connections = 4;
    opts.command = "cargo test -p edgeroute-lab --test gateway_bench".into();
    // LiteLLM has its own test below; here its absence must not change anything.
    opts.litellm_bin = None;
    opts
}

fn nginx() -> Option<PathBuf> {
    let p = PathBuf::from("/usr/sbin/nginx");
    p.exists().then_some(p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_every_target_in_one_run_and_stops_them_after() {
    let mut opts = small_opts(Path::new(FAKE));
    opts.nginx_bin = nginx();
    let report = gateway_bench::run(opts).await.unwrap();
    assert!(report.litellm.is_none());

    let expected_targets = if nginx().is_some() { 3 } else { 2 };
    assert_eq!(report.targets.len(), expected_targets);
    assert_eq!(report.phases.len(), 2);
    for phase in &report.phases {
        assert_eq!(phase.rows.len(), expected_targets);
        for row in &phase.rows {
            let load = &row.load;
            assert_eq!(load.scheduled, 120, "{:?} {}: {load:?}", row.target, phase.mode);
            assert_eq!(load.ok, 120, "{:?} {}: {load:?}", row.target, phase.mode);
            assert_eq!(load.errors.total(), 0);
            assert!(row.rss_start.is_some() && row.rss_end.is_some());
            assert_eq!(load.ttft_percentiles().is_some(), phase.mode == Mode::Stream);
        }
    }
    assert!(report.memory.iter().all(|m| m.before.is_some() && m.after.is_some()));
    let md = report.to_markdown();
    assert!(md.contains("## JSON answers at 200 requests/s"), "{md}");
    assert!(md.contains("## Streaming (SSE) answers at 200 requests/s"));
    assert!(md.contains("| edgeroute gateway |"));
    assert!(md.contains("hs256_secret_file"));
    if nginx().is_some() {
        assert!(md.contains("nginx/"), "{md}");
        assert!(md.contains("| nginx |"));
    }
    println!("{md}");

    // Every server is gone once run() returns: nothing listens on their ports.
    assert_all_stopped(&report);
    assert!(report.targets.iter().any(|t| t.kind == TargetKind::Gateway));
}

/// `--endpoints all`: chat and the four endpoints beside it, each loaded direct, through the
/// gateway and through nginx, checked (a WAV answer, a transcript…) and reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_endpoints_beside_chat_run_on_every_target() {
    let mut opts = small_opts(Path::new(FAKE));
    opts.nginx_bin = nginx();
    opts.modes = vec![Mode::Json];
    opts.endpoints = Endpoint::ALL.to_vec();
    opts.duration = Duration::from_millis(400);
    opts.warmup = Duration::from_millis(100);
    opts.rounds = 1;
    let report = gateway_bench::run(opts).await.unwrap();
    let expected_targets = if nginx().is_some() { 3 } else { 2 };
    let seen: Vec<(Endpoint, Mode)> = report.phases.iter().map(|p| (p.endpoint, p.mode)).collect();
    assert_eq!(
        seen,
        [
            (Endpoint::Chat, Mode::Json),
            (Endpoint::Embeddings, Mode::Json),
            (Endpoint::Completions, Mode::Json),
            (Endpoint::Transcriptions, Mode::Json),
            (Endpoint::Speech, Mode::Bytes),
        ]
    );
    for phase in &report.phases {
        assert_eq!(phase.rows.len(), expected_targets, "{:?}", phase.endpoint);
        for row in &phase.rows {
            let load = &row.load;
            assert_eq!(
                (load.scheduled, load.ok),
                (80, 80),
                "{:?} {:?}: {load:?}",
                row.target,
                phase.endpoint
            );
            assert_eq!(load.ttft_percentiles().is_some(), phase.endpoint == Endpoint::Speech);
        }
    }
    let speech = report.workloads.iter().find(|w| w.endpoint == Endpoint::Speech).unwrap();
    assert_eq!(speech.answer_bytes, 44 + 4800, "the fake's WAV, whole");
    let md = report.to_markdown();
    assert!(md.contains("## Summary: the endpoints beside chat (issue 19)"), "{md}");
    assert!(md.contains("## Summary: latency added over direct"), "chat is there too: {md}");
    assert!(md.contains("## `/v1/audio/transcriptions` at 200 requests/s"), "{md}");
    assert!(md.contains("| `/v1/audio/speech`, first audio byte, 200 req/s |"), "{md}");
    println!("{md}");
    assert_all_stopped(&report);
}

/// A gateway that cannot start fails the run with its log, and the simulator that was
/// already running is stopped all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_start_stops_what_was_started() {
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("pids");
    let wrapper = dir.path().join("edgeroute");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\necho $$ >> {pids}\nif [ \"$1\" = node ]; then echo 'config: unknown key' >&2; exit 2; fi\nexec {FAKE} \"$@\"\n",
            pids = pids.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .unwrap();

    let mut opts = small_opts(&wrapper);
    opts.nginx_bin = None;
    let err = gateway_bench::run(opts).await.unwrap_err();
    let text = format!("{err:#}");
    assert!(text.contains("gateway") && text.contains("config: unknown key"), "{text}");

    let started: Vec<u32> = std::fs::read_to_string(&pids)
        .unwrap()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    // sim, token mint, and three attempts at node.
    assert_eq!(started.len(), 5, "{started:?}");
    for pid in started {
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "pid {pid} survived");
    }
}

/// Every target stops after the run: nothing listens on its port, no process is left.
fn assert_all_stopped(report: &gateway_bench::GatewayBenchReport) {
    for t in &report.targets {
        assert!(
            TcpStream::connect_timeout(&t.addr, Duration::from_millis(200)).is_err(),
            "{:?} still listening on {}",
            t.kind,
            t.addr
        );
        assert!(
            !Path::new(&format!("/proc/{}", t.pid)).exists(),
            "{:?} pid {} alive",
            t.kind,
            t.pid
        );
    }
}

/// LiteLLM's proxy side by side with the others, at a rate within its cap: its one-request
/// checks (JSON and SSE through LiteLLM's own re-encoding) pass, it is loaded, reported with
/// its version and config, and stopped. Skipped when LiteLLM is not installed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn litellm_runs_beside_the_gateway_when_installed() {
    let Some(litellm) = gateway_bench::default_litellm_bin() else {
        eprintln!(
            "skipped: LiteLLM is not installed at {:?} (scripts/setup-litellm.sh installs it)",
            gateway_bench::litellm_venv_bin()
        );
        return;
    };
    let mut opts = small_opts(Path::new(FAKE));
    opts.nginx_bin = None;
    opts.litellm_bin = Some(litellm);
    // Well within what one LiteLLM worker sustains, even on 2 busy cores; and one rate above
    // the cap, where LiteLLM must not be loaded.
    opts.rates = vec![10.0, 200.0];
    opts.litellm_max_rate = 10.0;
    opts.duration = Duration::from_secs(2);
    opts.warmup = Duration::from_millis(500);
    opts.request_timeout = Duration::from_secs(20);
    let report = gateway_bench::run(opts).await.unwrap();

    let kinds: Vec<TargetKind> = report.targets.iter().map(|t| t.kind).collect();
    assert_eq!(kinds, [TargetKind::Direct, TargetKind::Gateway, TargetKind::LiteLlm]);
    let info = report.litellm.as_ref().unwrap();
    assert!(info.version.as_deref().is_some_and(|v| v.starts_with("1.")), "{info:?}");
    // The report shows the config with the master key masked.
    let config = info.config.as_deref().unwrap();
    assert!(config.contains(r#"master_key: "sk-<random per run>""#), "{config}");
    assert_eq!(report.phases.len(), 4);
    for phase in &report.phases {
        let lite = phase.rows.iter().find(|r| r.target == TargetKind::LiteLlm);
        if phase.rate > 10.0 {
            assert!(lite.is_none(), "LiteLLM loaded above its cap at {}", phase.rate);
            assert_eq!(phase.rows.len(), 2);
            continue;
        }
        let load = &lite.expect("a LiteLLM row at 10 req/s").load;
        assert_eq!(load.scheduled, 20, "{}: {load:?}", phase.mode);
        assert_eq!(load.ok, 20, "{}: {load:?}", phase.mode);
        assert_eq!(load.ttft_percentiles().is_some(), phase.mode == Mode::Stream);
    }
    let md = report.to_markdown();
    assert!(md.contains("| LiteLLM proxy |"), "{md}");
    assert!(md.contains("LiteLLM added p99"), "{md}");
    assert!(md.contains("```yaml"), "{md}");
    println!("{md}");
    assert_all_stopped(&report);
}
