//! The gateway/backend boundary on one machine, for real (issue 18): the backend (`edgeroute
//! sim`) runs in a network namespace of its own, joined by a veth pair only to the gateway's
//! namespace; the gateway (`edgeroute node`) is joined to the host by another. A client on the
//! host reaches the gateway — and through it the backend — but never the backend itself.
//!
//! Needs root and iproute2 (`ip netns`), as CI has; `EDGEROUTE_TEST_NETNS=0` skips it on a
//! machine without them (it fails, saying so, rather than pass silently).
#![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_edgeroute");

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap_or_else(|e| {
        panic!("`ip` did not run ({e}): apt-get install iproute2, or EDGEROUTE_TEST_NETNS=0")
    });
    assert!(
        out.status.success(),
        "ip {}: {} (needs root; EDGEROUTE_TEST_NETNS=0 skips this test)",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The namespaces and the processes in them; all removed when dropped.
struct World {
    namespaces: Vec<String>,
    children: Vec<Child>,
    dir: std::path::PathBuf,
}

impl Drop for World {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Deleting a namespace deletes the veth ends inside it, and with them their peers.
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl World {
    fn spawn_in(&mut self, ns: &str, args: &[&str], log: &str) {
        let log = std::fs::File::create(self.dir.join(log)).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", ns, BIN])
            .args(args)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        self.children.push(child);
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name)).unwrap_or_default()
    }
}

/// Whether the simulator itself answers at `addr` (its model list names `sim-llama`). A TCP
/// connect alone proves nothing: a sandbox's egress proxy may accept any connect.
async fn sim_answers(addr: SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let talk = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let req = format!("GET /v1/models HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf).await;
        Some(String::from_utf8_lossy(&buf).contains("sim-llama"))
    };
    matches!(tokio::time::timeout(Duration::from_secs(2), talk).await, Ok(Some(true)))
}

async fn connects(addr: SocketAddr, within: Duration) -> bool {
    matches!(tokio::time::timeout(within, tokio::net::TcpStream::connect(addr)).await, Ok(Ok(_)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reaches_the_gateway_and_through_it_the_backend_but_never_the_backend_itself() {
    #[allow(clippy::disallowed_methods)] // The operator's switch for a machine without root.
    let skip = std::env::var("EDGEROUTE_TEST_NETNS").as_deref() == Ok("0");
    if skip {
        eprintln!("skipped: EDGEROUTE_TEST_NETNS=0");
        return;
    }
    let tag = std::process::id() % 100_000;
    let net = u8::try_from(tag % 250).unwrap() + 1;
    let (gw, be) = (format!("ergw{tag}"), format!("erbe{tag}"));
    let dir = std::env::temp_dir().join(format!("edgeroute-boundary-{tag}"));
    std::fs::create_dir_all(&dir).unwrap();
    let mut w = World { namespaces: vec![], children: vec![], dir };
    for ns in [&gw, &be] {
        ip(&["netns", "add", ns]);
        w.namespaces.push(ns.clone());
        ip(&["-n", ns, "link", "set", "lo", "up"]);
    }
    // host (10.231.N.1) ⟷ gateway (10.231.N.2); gateway (10.232.N.1) ⟷ backend (10.232.N.2).
    let (hg, gh, gb, bg) =
        (format!("hg{tag}"), format!("gh{tag}"), format!("gb{tag}"), format!("bg{tag}"));
    ip(&["link", "add", &hg, "type", "veth", "peer", "name", &gh]);
    ip(&["link", "set", &gh, "netns", &gw]);
    ip(&["link", "add", &gb, "type", "veth", "peer", "name", &bg]);
    ip(&["link", "set", &gb, "netns", &gw]);
    ip(&["link", "set", &bg, "netns", &be]);
    let host_ip = format!("10.231.{net}.1");
    let gw_ip = format!("10.231.{net}.2");
    let gw_inner = format!("10.232.{net}.1");
    let be_ip = format!("10.232.{net}.2");
    ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &hg]);
    ip(&["link", "set", &hg, "up"]);
    ip(&["-n", &gw, "addr", "add", &format!("{gw_ip}/30"), "dev", &gh]);
    ip(&["-n", &gw, "link", "set", &gh, "up"]);
    ip(&["-n", &gw, "addr", "add", &format!("{gw_inner}/30"), "dev", &gb]);
    ip(&["-n", &gw, "link", "set", &gb, "up"]);
    ip(&["-n", &be, "addr", "add", &format!("{be_ip}/30"), "dev", &bg]);
    ip(&["-n", &be, "link", "set", &bg, "up"]);

    // The gateway's namespace routes nothing between its links (as a gateway pod does not).
    let st = Command::new("ip")
        .args(["netns", "exec", &gw, "sh", "-c", "echo 0 > /proc/sys/net/ipv4/ip_forward"])
        .status()
        .unwrap();
    assert!(st.success());

    // The backend, alone in its namespace.
    let backend: SocketAddr = format!("{be_ip}:8000").parse().unwrap();
    w.spawn_in(&be, &["sim", "--listen", &backend.to_string()], "sim.log");
    // The gateway, authenticating callers, reaching the backend on the private link.
    let secret = w.dir.join("secret");
    std::fs::write(&secret, edgeroute_test_util::SECRET).unwrap();
    let gateway: SocketAddr = format!("{gw_ip}:8080").parse().unwrap();
    let config = format!(
        "[node]\nid = \"gw-1\"\nregion = \"toronto\"\nlisten = \"{gateway}\"\ninsecure_public = true\n\
         [auth]\nhs256_secret_file = \"{}\"\n\
         [backend]\nkind = \"openai\"\nurl = \"http://{backend}\"\n[[backend.models]]\nid = \"sim-llama\"\n",
        secret.display()
    );
    std::fs::write(w.dir.join("node.toml"), config).unwrap();
    let cfg_path = w.dir.join("node.toml").display().to_string();
    w.spawn_in(&gw, &["node", "--config", &cfg_path], "node.log");

    // The client, on the host: the gateway answers...
    let t = Instant::now();
    while !connects(gateway, Duration::from_millis(200)).await {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "the gateway never listened: {}\n{}",
            w.log("node.log"),
            w.log("sim.log")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let token =
        edgeroute_test_util::node::mint_hs256("tenant-a", &[edgeroute_auth::Scope::Inference], 600);
    let chat =
        r#"{"model":"sim-llama","max_tokens":4,"messages":[{"role":"user","content":"hi"}]}"#;
    let t = Instant::now();
    let reply = loop {
        let r = edgeroute_test_util::post_json(
            gateway,
            "/v1/chat/completions",
            Some(&token),
            &[],
            chat,
        )
        .await;
        if r.status == 200 || t.elapsed() > Duration::from_secs(10) {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        reply.status,
        200,
        "through the gateway: {}\n{}",
        String::from_utf8_lossy(&reply.body),
        w.log("node.log")
    );
    // ... a caller without a token is refused there ...
    let r = edgeroute_test_util::post_json(gateway, "/v1/chat/completions", None, &[], chat).await;
    assert_eq!(r.status, 401);
    // ... and the backend itself is out of the client's reach (no route into its namespace).
    assert!(!sim_answers(backend).await, "the client reached the backend at {backend} directly");
    // Even with a route into it through the gateway's namespace: the gateway forwards nothing.
    ip(&["route", "add", &format!("10.232.{net}.0/30"), "via", &gw_ip]);
    assert!(
        !sim_answers(backend).await,
        "the gateway's namespace forwarded the client to the backend"
    );
    // The check is sound: with the gateway's namespace forwarding and a route back from the
    // backend (what a flat network would be), the same client does reach the simulator.
    let st = Command::new("ip")
        .args(["netns", "exec", &gw, "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"])
        .status()
        .unwrap();
    assert!(st.success());
    ip(&["-n", &be, "route", "add", &format!("10.231.{net}.0/30"), "via", &gw_inner]);
    assert!(sim_answers(backend).await, "a flat network should have let the client through");
    let _ = Command::new("ip").args(["route", "del", &format!("10.232.{net}.0/30")]).status();
    // The node knew its backend was on a private link: no exposure warning.
    assert!(!w.log("node.log").contains("neither loopback nor a private network"));
}
