//! The container image (issue 18): `scripts/build-image.sh` builds it from `scratch` with
//! buildah, no daemon, no registry; umoci unpacks it as a runtime would; its entrypoint then runs
//! as the image's own non-root user and serves (`edgeroute sim`), with nothing in the image but
//! the binary, its libraries and a passwd entry — no shell.
//!
//! Needs root, buildah and umoci (`scripts/test.sh` installs them; CI runs as root);
//! `EDGEROUTE_TEST_IMAGE=0` skips it on a machine without them (it fails, saying so, rather
//! than pass silently).
#![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?} did not run: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{} (needs root, buildah and umoci; EDGEROUTE_TEST_IMAGE=0 skips this test)",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Cleanup(std::path::PathBuf, Option<std::process::Child>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(c) = &mut self.1 {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_runs_its_entrypoint_as_a_non_root_user_and_holds_nothing_else() {
    #[allow(clippy::disallowed_methods)] // The operator's switch for a machine without root.
    let skip = std::env::var("EDGEROUTE_TEST_IMAGE").as_deref() == Ok("0");
    if skip {
        eprintln!("skipped: EDGEROUTE_TEST_IMAGE=0");
        return;
    }
    let dir = std::env::temp_dir().join(format!("edgeroute-image-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut guard = Cleanup(dir.clone(), None);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/build-image.sh");
    let layout = dir.join("layout");
    let built = run(Command::new("bash")
        .arg(&script)
        .arg("--binary")
        .arg(env!("CARGO_BIN_EXE_edgeroute"))
        .arg("--out")
        .arg(&layout)
        .args(["--tag", "test"]));
    assert!(built.trim().ends_with(":test"), "{built}");

    // Unpacked as a runtime would (an OCI runtime bundle: config.json and rootfs).
    let bundle = dir.join("bundle");
    run(Command::new("umoci")
        .arg("unpack")
        .arg("--image")
        .arg(format!("{}:test", layout.display()))
        .arg(&bundle));
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bundle.join("config.json")).unwrap()).unwrap();
    let process = &config["process"];
    let uid = process["user"]["uid"].as_u64().unwrap();
    assert_ne!(uid, 0, "the image runs as root: {process}");
    assert_eq!(process["args"][0], "/usr/local/bin/edgeroute", "{process}");
    let rootfs = bundle.join("rootfs");
    for absent in ["bin/sh", "usr/bin/env", "bin/bash"] {
        assert!(!rootfs.join(absent).exists(), "the image holds /{absent}");
    }

    // The entrypoint, as the image's user, in the image's root: it serves.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let log = std::fs::File::create(dir.join("sim.log")).unwrap();
    let child = Command::new("chroot")
        .arg(format!("--userspec={uid}:{uid}"))
        .arg(&rootfs)
        .arg("/usr/local/bin/edgeroute")
        .args(["sim", "--listen", &addr.to_string()])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    guard.1 = Some(child);
    let t = Instant::now();
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        let log = std::fs::read_to_string(dir.join("sim.log")).unwrap_or_default();
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the image's entrypoint never served: {log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let chat =
        r#"{"model":"sim-llama","max_tokens":3,"messages":[{"role":"user","content":"hi"}]}"#;
    let r = edgeroute_test_util::post_json(addr, "/v1/chat/completions", None, &[], chat).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
}
