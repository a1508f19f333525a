//! The routing policy inside discovery (issue 15), end to end over HTTP against nodes a fake
//! probe answers for:
//!
//! - residency, policy or not: a token confined to the EU is answered EU nodes only, whatever
//!   regions it asks for, and never a node of unknown jurisdiction; an unconfined one all;
//! - a canary policy (v1 95 / v2 5): every answer carries `x-edgeroute-decision`, a session
//!   keeps its version;
//! - hot reload: a bad text is refused (the last good policy stays, `/health` and `/metrics`
//!   say so), a good one is applied within about two reload intervals; a bad file at start
//!   refuses to start, naming the line;
//! - `explain=true` (admin) shows the rule, the attempts and the drops; an inference token
//!   asking it still gets 403.
#![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgeroute_auth::Scope;
use edgeroute_discovery::probe::{Probe, ProbeError, ProbeFuture};
use edgeroute_discovery::{Discovery, DiscoveryConfig, Spawned};
use edgeroute_proto::health::NodeHealth;
use edgeroute_test_util::node::{SECRET, mint_hs256, mint_hs256_fleet, mint_hs256_resident};
use edgeroute_test_util::{Reply, get};
use serde_json::{Value, json};

/// `(id, region, ready models)`.
type Node = (&'static str, &'static str, &'static [&'static str]);

/// Answers each node's `/health` from a table of [`Node`]s.
#[derive(Debug)]
struct FakeFleet(Vec<Node>);

impl FakeFleet {
    fn health(&self, host: &str) -> Option<NodeHealth> {
        let (id, region, models) = self.0.iter().find(|(id, _, _)| host == format!("{id}.test"))?;
        // `name@version`: the node reports that registry version for `name`.
        let models: Vec<Value> = models
            .iter()
            .map(|m| match m.split_once('@') {
                Some((m, v)) => json!({ "id": m, "state": "ready", "version": v }),
                None => json!({ "id": m, "state": "ready" }),
            })
            .collect();
        let p = json!({ "p50": 40.0, "p99": 80.0, "samples": 100 });
        // `cpu-*` nodes say they are CPU nodes; the others say nothing (taken as GPU).
        let hardware = id.starts_with("cpu-").then_some("cpu");
        serde_json::from_value(json!({
            "status": "ready", "ready": true, "node_id": id, "region": region,
            "version": "test", "uptime_s": 1, "models": models, "gpus": [],
            "queue_depth": 0, "in_flight": 0, "capacity": 4, "window_s": 60,
            "ttft_ms": p, "latency_ms": p, "error_rate": 0.0, "requests_in_window": 100,
            "hardware": hardware
        }))
        .ok()
    }
}

impl Probe for FakeFleet {
    fn probe(&self, uri: http::Uri) -> ProbeFuture {
        let h = uri.host().and_then(|host| self.health(host));
        Box::pin(async move { h.ok_or_else(|| ProbeError::Connect("no such node".into())) })
    }
}

/// fra and ams are the EU, nyc the US; par has no jurisdiction anywhere.
const NODES: &[Node] = &[
    ("fra-1", "fra", &["llama:v1", "other"]),
    ("ams-1", "ams", &["llama:v2", "other"]),
    ("nyc-1", "nyc", &["llama:v1", "other"]),
    ("par-1", "par", &["other"]),
];

const CANARY: &str = r#"
version = "p1"

[jurisdictions]
eu = ["fra", "ams"]
us = ["nyc"]

[[models]]
name = "llama"
default_version = "v1"
[[models.versions]]
id = "v1"
[[models.versions]]
id = "v2"

[[tenants]]
sub = "operator"
jurisdictions = ["eu"]

[[rules]]
id = "llama-canary"
match.models = ["llama"]
versions = { v1 = 95, v2 = 5 }
sticky = "session"
"#;

struct Lab {
    addr: SocketAddr,
    dir: PathBuf,
    _served: Spawned,
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("edgeroute-policy-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("secret"), SECRET).unwrap();
    dir
}

fn config(dir: &Path, extra: &str) -> String {
    config_with(dir, extra, &[])
}

/// As [`config`], with `jurisdiction = J` on the `[[nodes]]` entries `node_j` names.
fn config_with(dir: &Path, extra: &str, node_j: &[(&str, &str)]) -> String {
    config_of(NODES, dir, extra, node_j)
}

fn config_of(nodes: &[Node], dir: &Path, extra: &str, node_j: &[(&str, &str)]) -> String {
    let mut toml = format!(
        "[auth]\nhs256_secret_file = \"{}\"\n\
         [probe]\ninterval_ms = 100\ntimeout_ms = 50\n[health]\nmin_std_ms = 50\n{extra}\n",
        dir.join("secret").display()
    );
    for (id, region, _) in nodes {
        toml.push_str(&format!(
            "[[nodes]]\nid = \"{id}\"\nurl = \"http://{id}.test:8080\"\nregion = \"{region}\"\n"
        ));
        if let Some((_, j)) = node_j.iter().find(|(n, _)| n == id) {
            toml.push_str(&format!("jurisdiction = \"{j}\"\n"));
        }
    }
    toml
}

impl Lab {
    /// A replica over [`NODES`], with `extra` configuration, once every node is ready.
    async fn start(name: &str, extra: &str, policy: Option<&str>) -> Lab {
        let dir = scratch(name);
        let mut extra = extra.to_owned();
        if let Some(p) = policy {
            std::fs::write(dir.join("policy.toml"), p).unwrap();
            extra.push_str(&format!(
                "\n[policy]\nfile = \"{}\"\nreload_interval_ms = 100\n",
                dir.join("policy.toml").display()
            ));
        }
        let text = config(&dir, &extra);
        Lab::start_text(dir, &text).await
    }

    /// A replica from a whole config text, once every node is ready.
    async fn start_text(dir: PathBuf, text: &str) -> Lab {
        Lab::start_fleet(NODES, dir, text).await
    }

    /// As [`Lab::start_text`], over `nodes`.
    async fn start_fleet(nodes: &'static [Node], dir: PathBuf, text: &str) -> Lab {
        let cfg = DiscoveryConfig::from_toml(text, |_| None).unwrap();
        let d = Discovery::build(cfg).unwrap().with_probe(Arc::new(FakeFleet(nodes.to_vec())));
        let served = d.spawn(SocketAddr::from(([127, 0, 0, 1], 0))).await.unwrap();
        let lab = Lab { addr: served.addr(), dir, _served: served };
        let admin = mint_hs256_fleet("operator", &[Scope::Admin], 600);
        let t = Instant::now();
        loop {
            let seen = lab.get("/v1/nodes", &admin).await.json();
            let ready = seen["nodes"].as_array().unwrap().iter().filter(|n| n["health"] == "ready");
            if ready.count() == nodes.len() {
                return lab;
            }
            assert!(t.elapsed() < Duration::from_secs(10), "nodes not ready: {seen}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn get(&self, path: &str, token: &str) -> Reply {
        get(self.addr, path, Some(token)).await
    }

    /// The candidate ids answered for `query`, sorted.
    async fn ids(&self, query: &str, token: &str) -> Vec<String> {
        let r = self.get(&format!("/v1/discover?{query}"), token).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let mut ids: Vec<String> = r.json()["candidates"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["id"].as_str().unwrap().to_owned())
            .collect();
        ids.sort();
        ids
    }

    async fn health(&self) -> Value {
        get(self.addr, "/health", None).await.json()
    }

    async fn metrics(&self) -> String {
        String::from_utf8_lossy(&get(self.addr, "/metrics", None).await.body).into_owned()
    }

    fn write_policy(&self, text: &str) {
        std::fs::write(self.dir.join("policy.toml"), text).unwrap();
    }
}

fn inference() -> String {
    mint_hs256("tenant-a", &[Scope::Inference], 600)
}

fn eu() -> String {
    mint_hs256_resident("acme-eu", Some(&["eu"]), None)
}

#[tokio::test]
async fn a_static_nodes_jurisdiction_comes_from_its_own_entry() {
    let dir = scratch("static-jurisdiction");
    let text = config_with(&dir, "", &[("fra-1", "eu"), ("nyc-1", "us")]);
    let lab = Lab::start_text(dir, &text).await;
    assert_eq!(lab.ids("model=other&k=10", &eu()).await, ["fra-1"], "ams-1 and par-1: unknown");
    assert_eq!(lab.ids("model=other&k=10", &inference()).await.len(), 4);
}

#[tokio::test]
async fn without_a_policy_an_eu_token_gets_only_eu_nodes_whatever_it_asks() {
    let lab = Lab::start(
        "residency",
        "[jurisdictions]\nfra = \"eu\"\nams = \"eu\"\nnyc = \"us\"\n",
        None,
    )
    .await;
    let (eu, any) = (eu(), inference());
    assert_eq!(lab.ids("model=other&k=10", &any).await, ["ams-1", "fra-1", "nyc-1", "par-1"]);
    assert_eq!(
        lab.ids("model=other&k=10", &eu).await,
        ["ams-1", "fra-1"],
        "par-1: no jurisdiction"
    );
    assert_eq!(lab.ids("model=other&k=10&region=nyc,fra", &eu).await, ["fra-1"]);
    assert_eq!(lab.ids("model=other&k=10&region=par&near=par", &eu).await, Vec::<String>::new());
    let r = lab.get("/v1/discover?model=other&region=nyc", &eu).await;
    assert_eq!(r.json()["reason"]["code"], "residency_unsatisfied", "{}", r.json());
    assert_eq!(lab.ids("model=other&k=1&near=nyc", &eu).await.len(), 1, "near cannot add nyc-1");
    assert!(!lab.ids("model=other&k=1&near=nyc", &eu).await.contains(&"nyc-1".to_owned()));
    // A token confined by regions rather than jurisdictions.
    let ams = mint_hs256_resident("acme-ams", None, Some(&["ams"]));
    assert_eq!(lab.ids("model=other&k=10", &ams).await, ["ams-1"]);
    // Without a policy no answer carries a decision header, and nothing reports one.
    let r = lab.get("/v1/discover?model=other", &any).await;
    assert!(r.header("x-edgeroute-decision").is_none());
    assert!(lab.health().await.get("policy").is_none());
    assert!(!lab.metrics().await.contains("policy_info{"));
}

#[tokio::test]
async fn a_canary_policy_answers_with_the_decision_header_and_keeps_each_session_on_its_version() {
    let lab = Lab::start("canary", "", Some(CANARY)).await;
    let any = inference();
    let mut v2 = 0;
    for i in 0..200 {
        let path = format!("/v1/discover?model=llama&k=10&session=s-{i}");
        let r = lab.get(&path, &any).await;
        assert_eq!(r.status, 200);
        let header = r.header("x-edgeroute-decision").unwrap().to_owned();
        let body = r.json();
        let ver = body["policy"]["version_id"].as_str().unwrap().to_owned();
        assert_eq!(header, format!("v=p1;rule=llama-canary;tier=edge;ver={ver}"));
        let ids: Vec<&str> = body["candidates"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["id"].as_str().unwrap())
            .collect();
        match ver.as_str() {
            "v2" => {
                v2 += 1;
                assert_eq!(ids, ["ams-1"]);
            }
            _ => assert!(ids.iter().all(|id| ["fra-1", "nyc-1"].contains(id)), "{ids:?}"),
        }
        let again = lab.get(&path, &any).await;
        assert_eq!(again.header("x-edgeroute-decision"), Some(header.as_str()), "sticky");
    }
    assert!((1..=30).contains(&v2), "{v2} of 200 sessions on v2");
    // Residency holds under the policy: the EU token's claims, from the token alone.
    let eu = eu();
    for i in 0..20 {
        let ids = lab.ids(&format!("model=llama&k=10&session=e-{i}"), &eu).await;
        assert!(!ids.is_empty() && !ids.contains(&"nyc-1".to_owned()), "{ids:?}");
    }
    // A model the registry does not know: today's scoring, no decision header.
    let r = lab.get("/v1/discover?model=other&k=10", &any).await;
    assert!(r.header("x-edgeroute-decision").is_none());
    assert!(r.json().get("policy").is_none());
    assert_eq!(r.json()["candidates"].as_array().unwrap().len(), 4);
}

#[tokio::test]
async fn explain_shows_the_rule_the_attempts_and_each_drop_and_stays_admin_only() {
    let lab = Lab::start("explain", "", Some(CANARY)).await;
    let r = lab.get("/v1/discover?model=llama&explain=true", &inference()).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.error_code(), "insufficient_scope");
    // The admin's own tenant entry confines it to the EU: nyc-1 is a residency drop.
    let admin = mint_hs256_fleet("operator", &[Scope::Admin], 600);
    let r = lab.get("/v1/discover?model=llama&explain=true&session=s-1", &admin).await;
    assert_eq!(r.status, 200);
    let body = r.json();
    let ex = &body["policy_explain"];
    assert_eq!(ex["rule"], "llama-canary", "{body}");
    let attempts = ex["attempts"].as_array().unwrap();
    assert!(!attempts.is_empty());
    assert_eq!(attempts[0]["tier"], "edge");
    assert!(attempts[0]["filters"].as_array().unwrap().iter().any(|f| f == "residency"));
    let drops = ex["drops"].as_array().unwrap();
    let drop_of = |id: &str| drops.iter().find(|d| d["candidate"] == id && d["attempt"] == 0);
    assert_eq!(drop_of("par-1").unwrap()["filter"], "serves", "{drops:?}");
    if body["policy"]["version_id"] == "v1" {
        assert_eq!(drop_of("nyc-1").unwrap()["filter"], "residency", "{drops:?}");
    }
    assert!(r.header("x-edgeroute-decision").is_some());
}

#[tokio::test]
async fn a_bad_policy_is_refused_while_serving_and_a_good_one_is_applied_within_two_intervals() {
    let lab = Lab::start("reload", "", Some(CANARY)).await;
    let any = inference();
    let header = |r: &Reply| r.header("x-edgeroute-decision").unwrap_or_default().to_owned();
    lab.write_policy(&CANARY.replace("\"p1\"", "\"p2\"").replace("match.models", "match.modles"));
    let t = Instant::now();
    let health = loop {
        let h = lab.health().await;
        if h["policy"]["refused"] == 1 {
            break h;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "never refused: {h}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(health["policy"]["version"], "p1", "{health}");
    let why = health["policy"]["last_refusal"].as_str().unwrap();
    assert!(why.contains("modles") && why.contains("policy.toml"), "{why}");
    let r = lab.get("/v1/discover?model=llama&session=a", &any).await;
    assert!(header(&r).starts_with("v=p1;"), "{}", header(&r));
    let m = lab.metrics().await;
    assert!(m.contains("edgeroute_discovery_policy_reloads_total{result=\"refused\"} 1"), "{m}");
    assert!(m.contains("edgeroute_discovery_policy_info{version=\"p1\"} 1"), "{m}");

    lab.write_policy(&CANARY.replace("\"p1\"", "\"p3\""));
    let t = Instant::now();
    loop {
        let r = lab.get("/v1/discover?model=llama&session=a", &any).await;
        if header(&r).starts_with("v=p3;") {
            break;
        }
        // Two intervals of 100 ms, and slack for a shared machine.
        assert!(t.elapsed() < Duration::from_millis(700), "still {}", header(&r));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let h = lab.health().await;
    assert_eq!(h["policy"]["version"], "p3");
    assert!(h["policy"].get("last_refusal").is_none(), "{h}");
    let m = lab.metrics().await;
    assert!(m.contains("edgeroute_discovery_policy_reloads_total{result=\"applied\"} 1"), "{m}");
    assert!(m.contains("edgeroute_discovery_policy_info{version=\"p3\"} 1"), "{m}");
    assert!(!m.contains("policy_info{version=\"p1\"}"), "{m}");
}

#[tokio::test]
async fn a_bad_policy_file_at_start_refuses_to_start_naming_the_line() {
    let dir = scratch("start");
    let file = dir.join("policy.toml");
    std::fs::write(&file, "version = \"p1\"\n[[models]]\nname = 3\n").unwrap();
    let extra = format!("[policy]\nfile = \"{}\"\n", file.display());
    let cfg = DiscoveryConfig::from_toml(&config(&dir, &extra), |_| None).unwrap();
    let err = Discovery::build(cfg).unwrap_err().to_string();
    assert!(err.contains("policy.toml") && err.contains("line 3"), "{err}");
    std::fs::remove_file(&file).unwrap();
    let cfg = DiscoveryConfig::from_toml(&config(&dir, &extra), |_| None).unwrap();
    assert!(Discovery::build(cfg).is_err(), "a missing file refuses to start too");
}

#[tokio::test]
async fn without_a_policy_explain_lists_nodes_outside_the_admins_residency_as_excluded() {
    let lab =
        Lab::start("explain-residency", "[jurisdictions]\nfra = \"eu\"\nams = \"eu\"\n", None)
            .await;
    let opts = edgeroute_auth::MintOptions {
        sub: "operator-eu".into(),
        scopes: [Scope::Admin].into_iter().collect(),
        aud: Some(edgeroute_auth::admin::FLEET_AUDIENCE.into()),
        iss: None,
        ttl_s: 600,
        now_unix_s: edgeroute_core::clock::unix_ms() / 1000,
        kid: None,
        nbf: None,
        residency: Some(edgeroute_auth::Residency {
            jurisdictions: Some(vec!["eu".into()]),
            regions: None,
        }),
        claims: Default::default(),
    };
    let key = edgeroute_auth::SigningKey::Hs256(SECRET.as_bytes().to_vec());
    let admin_eu = edgeroute_auth::mint(&key, &opts).unwrap();
    let body = lab.get("/v1/discover?model=other&k=10&explain=true", &admin_eu).await.json();
    let ids = |key: &str, reason: Option<&str>| -> Vec<String> {
        let mut v: Vec<String> = body[key]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| reason.is_none_or(|r| c["reason"] == r))
            .map(|c| c["id"].as_str().unwrap().to_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(ids("candidates", None), ["ams-1", "fra-1"], "{body}");
    assert_eq!(ids("excluded", Some("residency")), ["nyc-1", "par-1"], "{body}");
}

#[tokio::test]
async fn a_candidate_policy_is_dry_run_for_the_fleets_admin_only() {
    let lab = Lab::start("check", "", Some(CANARY)).await;
    let admin = mint_hs256_fleet("operator", &[Scope::Admin], 600);
    let check = |token: Option<String>, body: String| {
        let addr = lab.addr;
        async move {
            edgeroute_test_util::post_json(addr, "/v1/policy/check", token.as_deref(), &[], body)
                .await
        }
    };
    // The canary widened to 50 %: sessions move to v2, and nothing is applied.
    let wider = CANARY.replace("v1 = 95, v2 = 5", "v1 = 50, v2 = 50").replace("\"p1\"", "\"p2\"");
    let r = check(Some(admin.clone()), wider).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let report = r.json();
    assert_eq!((report["valid"].as_bool(), report["version"].as_str()), (Some(true), Some("p2")));
    assert_eq!(report["live_version"], "p1");
    let moved = report["differences"].as_array().unwrap();
    assert!(!moved.is_empty(), "{report}");
    assert!(moved.iter().all(|d| d["candidate"]["version"] == "v2"), "{report}");
    assert_eq!(lab.health().await["policy"]["version"], "p1", "a check applies nothing");

    // A broken text is reported, not applied.
    let r = check(Some(admin.clone()), "version = ".into()).await;
    assert_eq!(r.json()["valid"], false);
    assert!(r.json()["error"].as_str().unwrap().contains("line"));

    // Who may not: an inference token, nobody.
    assert_eq!(check(Some(inference()), CANARY.into()).await.status, 403);
    assert_eq!(check(None, CANARY.into()).await.status, 401);
    let too_big = "#".repeat(2 << 20);
    assert_eq!(check(Some(admin), too_big).await.status, 413);
}

/// Each node loaded `llama` under its plain name; the versions come from what they report.
const VERSIONED: &[Node] = &[
    ("gpu-1", "fra", &["llama@v1"]),
    ("gpu-2", "fra", &["llama@v2"]),
    ("cpu-1", "fra", &["llama@v2"]),
];

const GPU_V2: &str = r#"
version = "p-gpu"
[[models]]
name = "llama"
default_version = "v1"
[[models.versions]]
id = "v1"
[[models.versions]]
id = "v2"

[[rules]]
id = "v2-on-gpus"
match.models = ["llama"]
versions = { v2 = 100 }
constraints.hardware = ["gpu"]
strategy = "least_connections"
"#;

#[tokio::test]
async fn the_policy_routes_on_the_versions_and_hardware_nodes_report_and_names_its_strategy() {
    let dir = scratch("reported-versions");
    std::fs::write(dir.join("policy.toml"), GPU_V2).unwrap();
    let extra = format!("[policy]\nfile = \"{}\"\n", dir.join("policy.toml").display());
    let text = config_of(VERSIONED, &dir, &extra, &[]);
    let lab = Lab::start_fleet(VERSIONED, dir, &text).await;
    let r = lab.get("/v1/discover?model=llama&k=10&strategy=cost_optimized", &inference()).await;
    let body = r.json();
    assert_eq!(lab.ids("model=llama&k=10", &inference()).await, ["gpu-2"], "{body}");
    assert_eq!(body["policy"]["version_id"], "v2");
    assert_eq!(body["strategy"], "least_connections", "the rule's strategy, not the client's");
    // The topology shows name x version x node, and each node's hardware class.
    let admin = mint_hs256_fleet("operator", &[Scope::Admin], 600);
    let t = lab.get("/v1/topology", &admin).await.json();
    assert_eq!(t["versions"]["llama"], json!({ "v1": ["gpu-1"], "v2": ["cpu-1", "gpu-2"] }));
    let hw: Vec<&str> =
        t["nodes"].as_array().unwrap().iter().filter_map(|n| n["hardware"].as_str()).collect();
    assert_eq!(hw, ["cpu"], "only cpu-1 said");
    let explain = lab.get("/v1/discover?model=llama&k=10&explain=true", &admin).await.json();
    let drops = explain["policy_explain"]["drops"].to_string();
    assert!(drops.contains("cpu-1") && drops.contains("gpu-1"), "{drops}");
}

const BY_PLAN: &str = r#"
version = "plans-1"
[[models]]
name = "llama"
default_version = "v1"
[[models.versions]]
id = "v1"
[[models.versions]]
id = "v2"

[[rules]]
id = "premium-on-v2"
match.models = ["llama"]
match.claims = { plan = "premium" }
versions = { v2 = 100 }

[[rules]]
id = "everyone-on-v1"
match.models = ["llama"]
versions = { v1 = 100 }
"#;

#[tokio::test]
async fn rules_match_on_the_tokens_other_claims() {
    let lab = Lab::start("claims", "", Some(BY_PLAN)).await;
    let mut opts = edgeroute_auth::MintOptions {
        sub: "acme".into(),
        scopes: [Scope::Inference].into_iter().collect(),
        aud: None,
        iss: None,
        ttl_s: 600,
        now_unix_s: edgeroute_core::clock::unix_ms() / 1000,
        kid: None,
        nbf: None,
        residency: None,
        claims: Default::default(),
    };
    let key = edgeroute_auth::SigningKey::Hs256(SECRET.as_bytes().to_vec());
    let basic = edgeroute_auth::mint(&key, &opts).unwrap();
    opts.claims.insert("plan".into(), "premium".into());
    let premium = edgeroute_auth::mint(&key, &opts).unwrap();
    opts.claims.insert("plan".into(), "basic".into());
    let other = edgeroute_auth::mint(&key, &opts).unwrap();
    assert_eq!(lab.ids("model=llama&k=10", &premium).await, ["ams-1"]);
    for t in [&basic, &other] {
        assert_eq!(lab.ids("model=llama&k=10", t).await, ["fra-1", "nyc-1"]);
    }
    let r = lab.get("/v1/discover?model=llama", &premium).await;
    assert!(r.header("x-edgeroute-decision").unwrap().contains("rule=premium-on-v2"));
}
