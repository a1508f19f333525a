//! Test support: a real `nats-server` per test, and helpers to drive a subscription.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use edgeroute_bus::{BusConfig, BusKind, FleetUpdate, FleetView, Publisher, Subscription};
use futures_util::StreamExt;
use tokio::time::Instant;

/// Finds the server binary, or fails the test with the way to get it.
fn binary() -> PathBuf {
    let sbin = Path::new("/usr/sbin/nats-server");
    if sbin.exists() {
        return sbin.to_owned();
    }
    #[allow(clippy::disallowed_methods)] // A test finding a program on the test machine.
    let path = std::env::var_os("PATH");
    path.into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("nats-server"))
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!(
                "nats-server not found: run `apt-get install nats-server` (scripts/test.sh does)"
            )
        })
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// A `nats-server -js` on a free loopback port with its own store directory, killed on drop.
pub struct NatsServer {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// The shipped configuration (`deploy/nats/nats-server.conf`) with these users, if any.
    config: Option<PathBuf>,
}

/// The JetStream store directory the shipped configuration names.
const SHIPPED_STORE: &str = "/var/lib/nats/jetstream";

/// The server configuration shipped in `deploy/nats/`.
pub fn shipped_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/nats/nats-server.conf")
}

impl NatsServer {
    /// Picks a port and a store directory without starting the server.
    pub fn reserve() -> Self {
        NatsServer {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
            config: None,
        }
    }

    /// Starts the shipped configuration with `users` (the text of its `users.conf`), its
    /// JetStream store moved to this server's directory (the only change), and the listen
    /// address given on the command line.
    pub async fn start_shipped(users: &str) -> Self {
        Self::start_shipped_with(users, |_| String::new()).await
    }

    /// [`NatsServer::start_shipped`] with `extra(dir)` appended to the configuration (e.g. a
    /// `tls` block naming files the caller writes into `dir`, this server's directory).
    pub async fn start_shipped_with(users: &str, extra: impl FnOnce(&Path) -> String) -> Self {
        let mut server = NatsServer::reserve();
        let config = server.dir.path().join("nats-server.conf");
        let shipped = std::fs::read_to_string(shipped_config()).unwrap();
        let store = server.dir.path().join("store");
        let mut text = shipped.replace(SHIPPED_STORE, &store.display().to_string());
        assert_ne!(text, shipped, "the shipped config no longer names {SHIPPED_STORE}");
        text.push_str(&extra(server.dir.path()));
        std::fs::write(&config, text).unwrap();
        std::fs::write(server.dir.path().join("users.conf"), users).unwrap();
        server.config = Some(config);
        server.spawn().await;
        server
    }

    /// A directory of this server's, for credentials files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Starts a server and waits until it accepts connections.
    pub async fn start() -> Self {
        let mut server = NatsServer::reserve();
        server.spawn().await;
        server
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server (same port, same store) and waits until it listens.
    pub async fn spawn(&mut self) {
        assert!(self.child.is_none(), "already running");
        let store = self.dir.path().join("store");
        let log = std::fs::File::create(self.dir.path().join("server.log")).unwrap();
        let mut command = Command::new(binary());
        command.args(["-a", "127.0.0.1", "-p", &self.port.to_string()]);
        match &self.config {
            Some(config) => command.arg("-c").arg(config),
            None => command.args(["-js", "-sd"]).arg(&store),
        };
        let child = command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log).spawn().unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "nats-server did not listen on {}: {}",
                self.port,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills the server (SIGKILL: no goodbye to clients) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A NATS bus config with test-sized timings (fast reconnects, short timeouts).
pub fn nats_config(url: &str) -> BusConfig {
    BusConfig {
        kind: BusKind::Nats,
        nats_url: url.to_owned(),
        heartbeat_ms: 500,
        expire_ms: 5_000,
        connect_timeout_ms: 500,
        op_timeout_ms: 1_000,
        reconnect_max_ms: 200,
        ..BusConfig::default()
    }
}

/// Drives `sub` until `done(view)` holds, collecting what it yields; fails after `within`.
pub async fn drive_until(
    sub: &mut Subscription,
    within: Duration,
    what: &str,
    done: impl Fn(&FleetView) -> bool,
) -> Vec<FleetUpdate> {
    let deadline = Instant::now() + within;
    let mut seen = Vec::new();
    while !done(sub.view()) {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; view: {:?}; counters: {:?}",
            sub.view().nodes().collect::<Vec<_>>(),
            sub.view().counters()
        );
        // Short polls: a rejected message changes counters without yielding anything.
        if let Ok(Some(update)) = tokio::time::timeout(Duration::from_millis(50), sub.next()).await
        {
            seen.push(update);
        }
    }
    seen
}

/// The next update, failing after `within`.
pub async fn next(sub: &mut Subscription, within: Duration) -> FleetUpdate {
    tokio::time::timeout(within, sub.next())
        .await
        .expect("no update in time")
        .expect("subscription ended")
}

/// Waits until the publisher has nothing queued (it all reached the bus).
pub async fn flushed(publisher: &Publisher, within: Duration) {
    let deadline = Instant::now() + within;
    while publisher.stats().queued > 0 {
        assert!(Instant::now() < deadline, "publisher not flushed: {:?}", publisher.stats());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
