//! The routing policy pushed over the bus (issue 15), end to end: three replicas following the
//! bus (`[policy] source = "bus"`), on the embedded bus and on a real `nats-server`, get each
//! pushed text, apply it through the same path as a file's and acknowledge it on the bus; a
//! refused push leaves the previous version in force on every replica (`/health`, `/metrics`,
//! the answers' decision header); a replica started after the push gets the current policy at
//! once. And the shadow policy (`[policy] shadow_file`): compared and counted, never answering.
#![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgeroute_bus::{Bus, BusConfig, PolicyResult, PolicyStatus};
use edgeroute_discovery::probe::{Probe, ProbeError, ProbeFuture};
use edgeroute_discovery::{Discovery, DiscoveryConfig, Spawned};
use edgeroute_proto::health::NodeHealth;
use edgeroute_test_util::get;
use edgeroute_test_util::nats::NatsServer;
use serde_json::{Value, json};

const WITHIN: Duration = Duration::from_secs(10);

/// Answers `/health` for fra-1 (llama:v1) and ams-1 (llama:v2).
#[derive(Debug)]
struct FakeFleet;

const NODES: &[(&str, &str, &str)] = &[("fra-1", "fra", "llama:v1"), ("ams-1", "ams", "llama:v2")];

impl Probe for FakeFleet {
    fn probe(&self, uri: http::Uri) -> ProbeFuture {
        let found = NODES.iter().find(|(id, _, _)| uri.host() == Some(&format!("{id}.test")));
        let h = found.and_then(|(id, region, model)| {
            let p = json!({ "p50": 40.0, "p99": 80.0, "samples": 100 });
            serde_json::from_value::<NodeHealth>(json!({
                "status": "ready", "ready": true, "node_id": id, "region": region,
                "version": "test", "uptime_s": 1,
                "models": [{ "id": model, "state": "ready" }], "gpus": [],
                "queue_depth": 0, "in_flight": 0, "capacity": 4, "window_s": 60,
                "ttft_ms": p, "latency_ms": p, "error_rate": 0.0, "requests_in_window": 100
            }))
            .ok()
        });
        Box::pin(async move { h.ok_or_else(|| ProbeError::Connect("no such node".into())) })
    }
}

fn policy(version: &str, weights: &str) -> String {
    format!(
        r#"
version = "{version}"
[[models]]
name = "llama"
default_version = "v1"
[[models.versions]]
id = "v1"
[[models.versions]]
id = "v2"
[[rules]]
id = "canary"
match.models = ["llama"]
versions = {{ {weights} }}
"#
    )
}

/// A replica's config: open (this is not about auth), the two nodes, `extra` tables.
fn config(id: &str, extra: &str) -> DiscoveryConfig {
    let mut toml = format!(
        "[discovery]\nid = \"{id}\"\nallow_unauthenticated = true\n\
         [probe]\ninterval_ms = 100\ntimeout_ms = 50\n[health]\nmin_std_ms = 50\n{extra}\n"
    );
    for (id, region, _) in NODES {
        toml.push_str(&format!(
            "[[nodes]]\nid = \"{id}\"\nurl = \"http://{id}.test:8080\"\nregion = \"{region}\"\n"
        ));
    }
    DiscoveryConfig::from_toml(&toml, |_| None).unwrap()
}

struct Replica {
    addr: SocketAddr,
    _served: Spawned,
}

impl Replica {
    /// A replica whose nodes are ready; on `bus` if given (embedded), else its `[bus]`.
    async fn start(cfg: DiscoveryConfig, bus: Option<Bus>) -> Replica {
        let mut d = Discovery::build(cfg).unwrap().with_probe(Arc::new(FakeFleet));
        if let Some(bus) = bus {
            d = d.with_bus(bus);
        }
        let served = d.spawn(SocketAddr::from(([127, 0, 0, 1], 0))).await.unwrap();
        let r = Replica { addr: served.addr(), _served: served };
        r.until("both nodes ready", |_, nodes| nodes == 2).await;
        r
    }

    async fn health(&self) -> Value {
        get(self.addr, "/health", None).await.json()
    }

    async fn metrics(&self) -> String {
        String::from_utf8(get(self.addr, "/metrics", None).await.body.to_vec()).unwrap()
    }

    /// The `x-edgeroute-decision` header of a discover answer for llama (none: not decided
    /// by a policy).
    async fn decision(&self, session: &str) -> Option<String> {
        let r = get(self.addr, &format!("/v1/discover?model=llama&session={session}"), None).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        r.header("x-edgeroute-decision").map(str::to_owned)
    }

    /// Waits until `done(health.policy, ready nodes)` holds.
    async fn until(&self, what: &str, done: impl Fn(&Value, usize) -> bool) -> Value {
        let t = Instant::now();
        loop {
            let h = self.health().await;
            let ready = h["nodes_by_health"]["ready"].as_u64().unwrap_or(0) as usize;
            if done(&h["policy"], ready) {
                return h;
            }
            assert!(t.elapsed() < WITHIN, "{what}: {h}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Three replicas, a push, a refused push, a late replica: what both transports must do.
/// `replica(id)` starts one replica following the bus; `pusher` is the admin's bus handle.
async fn three_replicas_follow_the_bus<F, Fut>(pusher: &Bus, replica: F)
where
    F: Fn(&'static str) -> Fut,
    Fut: Future<Output = Replica>,
{
    let replicas = [replica("disc-a").await, replica("disc-b").await, replica("disc-c").await];
    // No push yet: no policy, answers scored as without one.
    for r in &replicas {
        let h = r.health().await;
        assert_eq!(h["policy"]["source"], "bus", "{h}");
        assert_eq!(h["policy"]["version"], Value::Null, "{h}");
        assert_eq!(h["policy"]["applied_from"], Value::Null, "{h}");
        assert_eq!(r.decision("s1").await, None);
    }
    let mut acks = pusher.policy_statuses().await.unwrap();
    let r1 = pusher.put_policy(&policy("p1", "v1 = 100")).await.unwrap();
    let got = acks.collect(r1, 3, WITHIN).await;
    assert_eq!(got.len(), 3, "{got:?}");
    assert!(got.iter().all(|s| s.result == PolicyResult::Applied && s.version == "p1"), "{got:?}");
    for r in &replicas {
        let h = r.health().await;
        let p = &h["policy"];
        assert_eq!(
            (&p["version"], &p["applied_from"], &p["revision"]),
            (&json!("p1"), &json!("bus"), &json!(r1)),
            "{h}"
        );
        assert!(p["applied_at_ms"].as_u64().unwrap() > 0);
        let d = r.decision("s1").await.unwrap();
        assert!(d.contains("v=p1") && d.contains("ver=v1"), "{d}");
        assert!(r.metrics().await.contains("edgeroute_discovery_policy_info{version=\"p1\"} 1"));
    }

    // A broken text: every replica refuses it, says why, and keeps p1.
    let r2 =
        pusher.put_policy("version = \"p2\"\n[[rules]]\nid = \"x\"\nbogus = 1\n").await.unwrap();
    let got = acks.collect(r2, 3, WITHIN).await;
    assert_eq!(got.len(), 3, "{got:?}");
    for s in &got {
        assert_eq!((s.result, s.version.as_str()), (PolicyResult::Refused, "p1"), "{s:?}");
        assert!(s.reason.as_deref().unwrap().contains("bogus"), "{s:?}");
    }
    for r in &replicas {
        let h = r.health().await;
        let p = &h["policy"];
        assert_eq!((&p["version"], &p["revision"]), (&json!("p1"), &json!(r1)), "{h}");
        assert!(p["last_refusal"].as_str().unwrap().contains(&format!("bus revision {r2}")));
        assert!(r.decision("s1").await.unwrap().contains("v=p1"));
        let m = r.metrics().await;
        assert!(
            m.contains("edgeroute_discovery_policy_reloads_total{result=\"refused\"} 1"),
            "{m}"
        );
    }

    // The next good text replaces p1 everywhere; a replica started afterwards has it at once.
    let r3 = pusher.put_policy(&policy("p3", "v2 = 100")).await.unwrap();
    assert_eq!(acks.collect(r3, 3, WITHIN).await.len(), 3);
    for r in &replicas {
        assert!(r.decision("s1").await.unwrap().contains("ver=v2"));
        let h = r.health().await;
        assert_eq!(
            (&h["policy"]["version"], &h["policy"].get("last_refusal")),
            (&json!("p3"), &None)
        );
    }
    let late = replica("disc-late").await;
    late.until("the late replica has p3", |p, _| p["version"] == "p3").await;
    assert!(late.decision("s1").await.unwrap().contains("v=p3"));
}

#[tokio::test]
async fn a_push_reaches_three_replicas_on_the_embedded_bus_and_a_refused_one_changes_nothing() {
    let bus = Bus::embedded(&BusConfig::embedded()).unwrap();
    let pusher = bus.clone();
    three_replicas_follow_the_bus(&pusher, |id| {
        let bus = bus.clone();
        async move {
            let cfg = config(id, "[policy]\nsource = \"bus\"\n[bus]\nkind = \"embedded\"\n");
            Replica::start(cfg, Some(bus)).await
        }
    })
    .await;
}

#[tokio::test]
async fn a_push_reaches_three_replicas_over_nats_and_a_refused_one_changes_nothing() {
    let server = NatsServer::start();
    let bus_cfg =
        BusConfig { op_timeout_ms: 1000, reconnect_max_ms: 200, ..BusConfig::nats(server.url()) };
    let pusher = Bus::connect(&bus_cfg).await.unwrap();
    let t = Instant::now();
    while !pusher.is_connected() {
        assert!(t.elapsed() < WITHIN);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let url = server.url();
    three_replicas_follow_the_bus(&pusher, |id| {
        let url = url.clone();
        async move {
            let extra = format!(
                "[policy]\nsource = \"bus\"\n[bus]\nkind = \"nats\"\nnats_url = \"{url}\"\nreconnect_max_ms = 200\n"
            );
            Replica::start(config(id, &extra), None).await
        }
    })
    .await;
}

#[tokio::test]
async fn a_replica_started_before_the_first_push_waits_for_it_and_acknowledges_it() {
    // On NATS the bucket does not exist until the first push: the replica keeps trying.
    let server = NatsServer::start();
    let url = server.url();
    let extra =
        format!("[policy]\nsource = \"bus\"\n[bus]\nkind = \"nats\"\nnats_url = \"{url}\"\n");
    let r = Replica::start(config("disc-early", &extra), None).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pusher = Bus::connect(&BusConfig::nats(url)).await.unwrap();
    while !pusher.is_connected() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut acks = pusher.policy_statuses().await.unwrap();
    let rev = pusher.put_policy(&policy("p1", "v1 = 100")).await.unwrap();
    let got = acks.collect(rev, 1, WITHIN).await;
    assert_eq!(
        got,
        [PolicyStatus {
            replica: "disc-early".into(),
            revision: rev,
            version: "p1".into(),
            result: PolicyResult::Applied,
            reason: None
        }]
    );
    r.until("p1 applied", |p, _| p["version"] == "p1").await;
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("edgeroute-push-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test]
async fn a_shadow_policy_is_counted_beside_the_live_one_and_never_answers() {
    let dir = scratch("shadow");
    std::fs::write(dir.join("live.toml"), policy("live-1", "v1 = 100")).unwrap();
    std::fs::write(dir.join("candidate.toml"), policy("cand-1", "v1 = 50, v2 = 50")).unwrap();
    let extra = format!(
        "[policy]\nfile = \"{}\"\nshadow_file = \"{}\"\nshadow_max_examples = 3\nreload_interval_ms = 100\n",
        dir.join("live.toml").display(),
        dir.join("candidate.toml").display()
    );
    let r = Replica::start(config("disc-shadow", &extra), None).await;
    r.until("the shadow loaded", |p, _| p["shadow"]["version"] == "cand-1").await;
    let sessions = 40;
    for i in 0..sessions {
        let d = r.decision(&format!("s{i}")).await.unwrap();
        // The live policy answers, always v1.
        assert!(d.contains("v=live-1") && d.contains("ver=v1"), "{d}");
    }
    let h = r.health().await;
    let s = &h["policy"]["shadow"];
    assert_eq!(s["compared"], sessions, "{h}");
    let differed = s["differed"].as_u64().unwrap();
    // About half the sessions go to v2 under the candidate (a fixed hash: not 0, not all).
    assert!((5..35).contains(&differed), "{h}");
    let examples = s["examples"].as_array().unwrap();
    assert_eq!(examples.len(), 3, "{h}");
    assert!(
        examples.iter().all(|e| e["differs_in"].as_array().unwrap().contains(&json!("version")))
    );
    assert!(examples.iter().all(|e| e.get("session").is_none()), "no session on an open route");
    let m = r.metrics().await;
    assert!(
        m.contains(&format!(
            "edgeroute_discovery_policy_shadow_total{{result=\"differs\"}} {differed}"
        )),
        "{m}"
    );
    let same = sessions - differed;
    assert!(
        m.contains(&format!("edgeroute_discovery_policy_shadow_total{{result=\"same\"}} {same}")),
        "{m}"
    );
    // A broken candidate is refused; the previous shadow keeps being compared.
    std::fs::write(dir.join("candidate.toml"), "version = [").unwrap();
    r.until("the broken candidate refused", |p, _| p["shadow"]["last_refusal"].is_string()).await;
    r.decision("s-after").await.unwrap();
    let h = r.health().await;
    assert_eq!(
        (&h["policy"]["shadow"]["version"], &h["policy"]["shadow"]["compared"]),
        (&json!("cand-1"), &json!(sessions + 1))
    );
    std::fs::remove_dir_all(dir).unwrap();
}
