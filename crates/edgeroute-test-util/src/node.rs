//! A real node on a loopback port, configured from a TOML snippet, with tokens minted for it.

use std::net::SocketAddr;
use std::path::PathBuf;

use edgeroute_auth::{MintOptions, Scope, Scopes, SigningKey};
use edgeroute_node::{AppState, Node, NodeConfig};

/// The HS256 secret every test node trusts (test-only, 32+ bytes).
pub const SECRET: &str = "edgeroute-test-secret-0123456789abcdef";

#[derive(Debug)]
pub struct TestNode {
    pub addr: SocketAddr,
    pub state: AppState,
    dir: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

fn now() -> u64 {
    edgeroute_core::clock::unix_ms() / 1000
}

/// A fresh directory holding the test secret: (the directory, the secret's file).
fn secret_dir() -> (PathBuf, PathBuf) {
    let dir =
        std::env::temp_dir().join(format!("edgeroute-test-{}-{}", std::process::id(), unique()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let secret = dir.join("secret");
    std::fs::write(&secret, SECRET).expect("write secret");
    (dir, secret)
}

impl TestNode {
    /// Starts a node whose config is `[node]` (id `test-1`, region `local`) and `[auth]` (the
    /// test secret) followed by `extra` (more sections, e.g. `[limits]`, `[backend]`).
    pub async fn start(extra: &str) -> TestNode {
        Self::start_with(extra, |_| None).await
    }

    pub async fn start_with(extra: &str, env: impl Fn(&str) -> Option<String>) -> TestNode {
        Self::start_full("", extra, env, None).await
    }

    /// As [`TestNode::start`], publishing on `bus` (e.g. an embedded bus the test subscribes to).
    pub async fn start_with_bus(extra: &str, bus: edgeroute_bus::Bus) -> TestNode {
        Self::start_full("", extra, |_| None, Some(bus)).await
    }

    /// A node named `id` in `region`, optionally publishing on `bus`: for fleets.
    pub async fn start_as(
        id: &str,
        region: &str,
        extra: &str,
        bus: Option<edgeroute_bus::Bus>,
    ) -> TestNode {
        let (id, region) = (id.to_owned(), region.to_owned());
        let env = move |k: &str| match k {
            "EDGEROUTE_NODE_ID" => Some(id.clone()),
            "EDGEROUTE_REGION" => Some(region.clone()),
            _ => None,
        };
        Self::start_full("", extra, env, bus).await
    }

    /// As [`TestNode::start`], with more keys in the `[auth]` table (e.g. `jwks_file`).
    pub async fn start_with_auth(auth_extra: &str, extra: &str) -> TestNode {
        Self::start_full(auth_extra, extra, |_| None, None).await
    }

    async fn start_full(
        auth_extra: &str,
        extra: &str,
        env: impl Fn(&str) -> Option<String>,
        bus: Option<edgeroute_bus::Bus>,
    ) -> TestNode {
        let (dir, secret) = secret_dir();
        let text = format!(
            "[node]\nid = \"test-1\"\nregion = \"local\"\nlisten = \"127.0.0.1:0\"\n[auth]\nhs256_secret_file = \"{}\"\n{auth_extra}\n{extra}",
            secret.display()
        );
        let cfg =
            NodeConfig::parse(&text, env).unwrap_or_else(|e| panic!("test config: {e}\n{text}"));
        Self::serve(cfg, dir, bus).await
    }

    /// Starts a node from a typed config (e.g. one of a `FleetSpec`'s), trusting the test
    /// secret whatever `cfg.auth` says.
    pub async fn start_config(mut cfg: NodeConfig, bus: Option<edgeroute_bus::Bus>) -> TestNode {
        let (dir, secret) = secret_dir();
        cfg.node.allow_unauthenticated = false;
        cfg.auth = Some(edgeroute_auth::AuthConfig {
            hs256_secret_file: Some(secret),
            ..Default::default()
        });
        Self::serve(cfg, dir, bus).await
    }

    async fn serve(cfg: NodeConfig, dir: PathBuf, bus: Option<edgeroute_bus::Bus>) -> TestNode {
        let mut node = Node::build(cfg).expect("build node");
        if let Some(bus) = bus {
            node = node.with_bus(bus);
        }
        let state = node.state().clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            node.serve(listener, async {
                let _ = rx.await;
            })
            .await
            .expect("node serve");
        });
        TestNode { addr, state, dir, stop: Some(tx), task: Some(task) }
    }

    /// `POST /v1/chat/completions` with an inference token.
    pub async fn chat(&self, body: impl Into<bytes::Bytes>) -> crate::Reply {
        crate::post_json(self.addr, "/v1/chat/completions", Some(&self.token()), &[], body).await
    }

    /// `POST` to an admin endpoint (`/v1/models/load`, `/admin/drain`, ...) with an admin token.
    pub async fn admin_post(&self, path: &str, body: impl Into<bytes::Bytes>) -> crate::Reply {
        crate::post_json(self.addr, path, Some(&self.admin_token()), &[], body).await
    }

    /// Loads `root/<model>` (a directory of weights under the node's `allowed_local_roots`)
    /// as `model`, at registry `version` when given, and waits until it is ready.
    pub async fn load_local(&self, root: &std::path::Path, model: &str, version: Option<&str>) {
        let mut body = serde_json::json!({"path": root.join(model), "id": model});
        if let Some(v) = version {
            body["version"] = v.into();
        }
        let r = self.admin_post("/v1/models/load", body.to_string()).await;
        assert!(r.status.is_success(), "{}", String::from_utf8_lossy(&r.body));
        self.wait_model(model, "ready", std::time::Duration::from_secs(10)).await;
    }

    /// Polls `GET /v1/models/{id}` until the model is in `state`; panics after `limit`.
    pub async fn wait_model(
        &self,
        id: &str,
        state: &str,
        limit: std::time::Duration,
    ) -> serde_json::Value {
        let t = std::time::Instant::now();
        loop {
            let r = crate::get(self.addr, &format!("/v1/models/{id}"), Some(&self.token())).await;
            if r.status == 200 && r.json()["state"] == state {
                return r.json();
            }
            assert!(
                t.elapsed() < limit,
                "model `{id}` never became {state}: {}",
                String::from_utf8_lossy(&r.body)
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// A scratch directory removed with the node.
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    pub fn token_for(&self, sub: &str, scopes: &[Scope], ttl_s: i64) -> String {
        mint_hs256(sub, scopes, ttl_s)
    }

    /// An inference-scoped token for tenant `tenant-a`.
    pub fn token(&self) -> String {
        mint_hs256("tenant-a", &[Scope::Inference], 600)
    }

    /// An admin-scoped token for this node (`aud` = `edgeroute:node:<id>`).
    pub fn admin_token(&self) -> String {
        let mut o = options("operator", &[Scope::Admin], 600);
        o.aud = Some(edgeroute_auth::admin::node_audience(&self.state.id));
        edgeroute_auth::mint(&SigningKey::Hs256(SECRET.as_bytes().to_vec()), &o).expect("mint")
    }

    /// Begins shutdown and returns the server task so the test can await it.
    pub fn begin_shutdown(&mut self) -> tokio::task::JoinHandle<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.task.take().expect("node already stopped")
    }
}

/// Mints an HS256 token with the test secret; a negative `ttl_s` gives an expired token.
/// A routing policy (version `cascade-1`) whose one rule answers `nemotron` with `llama` when
/// no node serves `nemotron` (both models at registry version `v1`).
pub const CASCADE_POLICY: &str = r#"
version = "cascade-1"

[[models]]
name = "nemotron"
[[models.versions]]
id = "v1"

[[models]]
name = "llama"
[[models.versions]]
id = "v1"

[[rules]]
id = "nemotron-else-llama"
match.models = ["nemotron"]
cascade = ["llama"]
"#;

pub fn mint_hs256(sub: &str, scopes: &[Scope], ttl_s: i64) -> String {
    edgeroute_auth::mint(
        &SigningKey::Hs256(SECRET.as_bytes().to_vec()),
        &options(sub, scopes, ttl_s),
    )
    .expect("mint")
}

/// As [`mint_hs256`], with the admin audience of the whole fleet (`edgeroute:fleet`).
pub fn mint_hs256_fleet(sub: &str, scopes: &[Scope], ttl_s: i64) -> String {
    let mut o = options(sub, scopes, ttl_s);
    o.aud = Some(edgeroute_auth::admin::FLEET_AUDIENCE.into());
    edgeroute_auth::mint(&SigningKey::Hs256(SECRET.as_bytes().to_vec()), &o).expect("mint")
}

/// An inference token whose tenant is confined by residency claims (`jurisdictions`,
/// `regions`; `None` leaves a claim out).
pub fn mint_hs256_resident(
    sub: &str,
    jurisdictions: Option<&[&str]>,
    regions: Option<&[&str]>,
) -> String {
    let list = |l: Option<&[&str]>| l.map(|l| l.iter().map(|s| (*s).to_owned()).collect());
    let mut o = options(sub, &[Scope::Inference], 600);
    o.residency = Some(edgeroute_auth::Residency {
        jurisdictions: list(jurisdictions),
        regions: list(regions),
    });
    edgeroute_auth::mint(&SigningKey::Hs256(SECRET.as_bytes().to_vec()), &o).expect("mint")
}

fn options(sub: &str, scopes: &[Scope], ttl_s: i64) -> MintOptions {
    let scopes: Scopes = scopes.iter().copied().collect();
    let (now_unix_s, ttl) =
        if ttl_s >= 0 { (now(), ttl_s as u64) } else { (now() - 3600, (3600 + ttl_s) as u64) };
    MintOptions {
        sub: sub.into(),
        scopes,
        aud: None,
        iss: None,
        ttl_s: ttl,
        now_unix_s,
        kid: None,
        nbf: None,
        residency: None,
        claims: Default::default(),
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.abort();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
