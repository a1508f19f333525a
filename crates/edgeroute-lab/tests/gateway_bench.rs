//! The benchmark's orchestration end to end, against `fake-edgeroute` (a stand-in with the
//! real binary's command line) and nginx when it is installed. Figures are not asserted:
//! only that every target was started, loaded, reported and stopped.

// Helpers outside #[test] bodies unwrap too: clippy.toml's allow-unwrap-in-tests only
// covers the test functions themselves, and a panic here is still a failed test.
#![allow(clippy::unwrap_used)]

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use edgeroute_lab::gateway_bench::{self, GatewayBenchOpts, TargetKind};
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
    assert!(report.targets.iter().any(|t| t.kind == TargetKind::Gateway));
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
