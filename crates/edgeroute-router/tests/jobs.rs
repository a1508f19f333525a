//! The router's async jobs over real simulator nodes, a discovery replica and real router
//! replicas: OpenAI's Batch API from upload to output file, single async requests with signed
//! webhooks, cancel during in-flight items, tenants kept apart, and the faults — a router
//! SIGKILLed mid-batch and restarted on its SQLite file, two replicas on PostgreSQL with one
//! killed, a node killed mid-job — each ending with every item in exactly one file, once.
//!
//! Router processes are this test binary re-run as the ignored `child_router` (a real process
//! to kill: its workers, leases and sockets die with it).
#![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgeroute_auth::Scope;
use edgeroute_router::{RouterConfig, RouterService};
use edgeroute_test_util::node::mint_hs256;
use edgeroute_test_util::{get, post_json};

const CONFIG_VAR: &str = "EDGEROUTE_ROUTER_CHILD_CONFIG";

/// The child: serves the router config in `$EDGEROUTE_ROUTER_CHILD_CONFIG` on a free port,
/// prints `listening <addr>`, and runs until killed (at most ten minutes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by the fault tests as their router process"]
async fn child_router() {
    #[allow(clippy::disallowed_methods)] // The parent hands the child its config.
    let Ok(path) = std::env::var(CONFIG_VAR) else { return };
    let cfg = RouterConfig::from_toml(&std::fs::read_to_string(path).unwrap()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!("listening {}", listener.local_addr().unwrap());
    let service = RouterService::open(cfg).await.unwrap();
    service.serve(listener, tokio::time::sleep(Duration::from_secs(600))).await.unwrap();
}

mod common;
use common::{Fleet, router_metric};

async fn fleet(tag: &str, tokens_per_s: f64) -> Fleet {
    Fleet::start(tag, tokens_per_s, (100, 80)).await
}

trait JobsConfig {
    fn config(&self, id: &str, store: &str, jobs: &str) -> String;
    fn sqlite(&self) -> String;
}

impl JobsConfig for Fleet {
    /// A router config: `store`, and `[jobs]` lines.
    fn config(&self, id: &str, store: &str, jobs: &str) -> String {
        let secret = self.dir.join("secret");
        self.router_config(
            id,
            &format!(
                "[jobs]\nstore = \"{store}\"\ndelegation_key_file = \"{}\"\ndelegation_alg = \"hs256\"\n\
                 lease_ms = 3000\ntick_ms = 200\nbusy_backoff_ms = 200\n{jobs}",
                secret.display()
            ),
        )
    }

    fn sqlite(&self) -> String {
        format!("sqlite:{}", self.dir.join("jobs.db").display())
    }
}

/// An in-process router replica (its job loops included).
struct InProcess {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl InProcess {
    async fn start(text: &str) -> InProcess {
        let cfg = RouterConfig::from_toml(text).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = RouterService::open(cfg).await.unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            service
                .serve(listener, async move {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
        InProcess { addr, stop: Some(tx), task }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().map(|s| s.send(()));
        let _ = (&mut self.task).await;
    }
}

/// A router process (this binary's `child_router`).
struct Proc {
    child: Child,
    addr: SocketAddr,
}

impl Proc {
    fn start(dir: &Path, name: &str, text: &str) -> Proc {
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, text).unwrap();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--ignored", "--exact", "child_router", "--nocapture", "--test-threads=1"])
            .env(CONFIG_VAR, &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut addr = None;
        for line in (&mut out).lines() {
            let line = line.unwrap();
            // libtest prints `test child_router ... ` first, without a newline.
            if let Some((_, a)) = line.split_once("listening ") {
                addr = Some(a.trim().parse().unwrap());
                break;
            }
        }
        // Whatever else the child prints is read and dropped (a closed pipe would fail it).
        std::thread::spawn(move || out.lines().for_each(drop));
        Proc { child, addr: addr.expect("the router child never listened") }
    }

    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn token(tenant: &str) -> String {
    mint_hs256(tenant, &[Scope::Inference], 600)
}

fn input(n: usize, max_tokens: u32) -> String {
    (0..n)
        .map(|i| {
            serde_json::json!({
                "custom_id": format!("req-{i}"), "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "sim-llama", "max_tokens": max_tokens,
                         "messages": [{"role": "user", "content": format!("question {i}")}]}
            })
            .to_string()
                + "\n"
        })
        .collect()
}

/// `POST /v1/files` as multipart, the way OpenAI's clients send it.
async fn upload(addr: SocketAddr, token: &str, text: &str) -> edgeroute_test_util::Reply {
    let boundary = "edgeroute-test-boundary";
    let body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n\
         Content-Type: application/jsonl\r\n\r\n{text}\r\n--{boundary}--\r\n"
    );
    let ct = format!("multipart/form-data; boundary={boundary}");
    post_json(addr, "/v1/files", Some(token), &[("content-type", &ct)], body).await
}

async fn create_batch(addr: SocketAddr, token: &str, n: usize, max_tokens: u32) -> String {
    let f = upload(addr, token, &input(n, max_tokens)).await;
    assert_eq!(f.status, 200, "{}", String::from_utf8_lossy(&f.body));
    let body = serde_json::json!({
        "input_file_id": f.json()["id"], "endpoint": "/v1/chat/completions",
        "completion_window": "24h", "metadata": {"purpose": "test"}
    });
    let b = post_json(addr, "/v1/batches", Some(token), &[], body.to_string()).await;
    assert_eq!(b.status, 200, "{}", String::from_utf8_lossy(&b.body));
    assert_eq!(b.json()["status"], "in_progress");
    b.json()["id"].as_str().unwrap().to_owned()
}

/// Polls the batch on `addrs` in turn until it is terminal.
async fn wait_terminal(
    addrs: &[SocketAddr],
    token: &str,
    id: &str,
    within: Duration,
) -> serde_json::Value {
    let t = Instant::now();
    loop {
        for &addr in addrs {
            let r = tokio::time::timeout(
                Duration::from_secs(2),
                get(addr, &format!("/v1/batches/{id}"), Some(token)),
            )
            .await;
            if let Ok(r) = r
                && r.status == 200
            {
                let b = r.json();
                let c = &b["request_counts"];
                let total = c["total"].as_u64().unwrap();
                assert!(
                    c["completed"].as_u64().unwrap() + c["failed"].as_u64().unwrap() <= total,
                    "counts add up at every step: {c}"
                );
                if ["completed", "failed", "expired", "cancelled"]
                    .contains(&b["status"].as_str().unwrap())
                {
                    return b;
                }
            }
        }
        assert!(t.elapsed() < within, "batch {id} not finished after {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The output and error files' lines by custom_id: (in output, error code). Each id at most
/// once across both files.
async fn results(
    addr: SocketAddr,
    token: &str,
    b: &serde_json::Value,
) -> BTreeMap<String, (bool, Option<String>)> {
    let mut out = BTreeMap::new();
    for (key, ok) in [("output_file_id", true), ("error_file_id", false)] {
        let Some(id) = b[key].as_str() else { continue };
        let r = get(addr, &format!("/v1/files/{id}/content"), Some(token)).await;
        assert_eq!(r.status, 200);
        for line in String::from_utf8(r.body.to_vec()).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let cid = v["custom_id"].as_str().unwrap().to_owned();
            if ok {
                assert_eq!(v["response"]["status_code"], 200);
                assert!(v["response"]["body"]["choices"][0]["message"]["content"].is_string());
            }
            let code = v["error"]["code"].as_str().map(str::to_owned);
            assert!(out.insert(cid.clone(), (ok, code)).is_none(), "{cid} twice in the files");
        }
    }
    out
}

fn all_ok(n: usize, r: &BTreeMap<String, (bool, Option<String>)>) {
    assert_eq!(r.len(), n, "every item in a file");
    assert!(r.values().all(|(ok, _)| *ok), "every item answered: {r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_runs_from_upload_to_output_file_with_openai_shapes() {
    let f = fleet("batch", 5000.0).await;
    let router = InProcess::start(&f.config("router-tor", &f.sqlite(), "")).await;
    let acme = token("acme");
    let id = create_batch(router.addr, &acme, 12, 4).await;
    let b = wait_terminal(&[router.addr], &acme, &id, Duration::from_secs(30)).await;
    assert_eq!(b["status"], "completed");
    assert_eq!(b["request_counts"], serde_json::json!({"total": 12, "completed": 12, "failed": 0}));
    assert_eq!(b["metadata"]["purpose"], "test");
    assert!(b["completed_at"].is_u64() && b["error_file_id"].is_null());
    all_ok(12, &results(router.addr, &acme, &b).await);
    // The list: newest first, one page at a time.
    let id2 = create_batch(router.addr, &acme, 1, 2).await;
    let l = get(router.addr, "/v1/batches?limit=1", Some(&acme)).await;
    assert_eq!(l.status, 200);
    assert_eq!(
        (l.json()["data"][0]["id"].as_str(), l.json()["has_more"].as_bool()),
        (Some(id2.as_str()), Some(true))
    );
    let l = get(router.addr, &format!("/v1/batches?limit=5&after={id2}"), Some(&acme)).await;
    assert_eq!(l.json()["data"][0]["id"], id.as_str());
    assert_eq!(l.json()["has_more"], false);
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_see_only_their_own_files_and_batches_and_bad_input_is_named() {
    let f = fleet("tenants", 5000.0).await;
    let router = InProcess::start(&f.config("router-tor", &f.sqlite(), "")).await;
    let (acme, other) = (token("acme"), token("other"));
    let id = create_batch(router.addr, &acme, 1, 2).await;
    let b = wait_terminal(&[router.addr], &acme, &id, Duration::from_secs(30)).await;
    let out = b["output_file_id"].as_str().unwrap();
    for path in [
        format!("/v1/batches/{id}"),
        format!("/v1/files/{out}"),
        format!("/v1/files/{out}/content"),
    ] {
        assert_eq!(get(router.addr, &path, Some(&other)).await.status, 404, "{path}");
        assert_eq!(get(router.addr, &path, None).await.status, 401, "{path}");
    }
    let c =
        post_json(router.addr, &format!("/v1/batches/{id}/cancel"), Some(&other), &[], "").await;
    assert_eq!(c.status, 404);
    assert_eq!(
        get(router.addr, "/v1/batches", Some(&other)).await.json()["data"],
        serde_json::json!([])
    );
    // Another tenant's input file cannot start a batch.
    let f2 = upload(router.addr, &acme, &input(1, 2)).await;
    let body = serde_json::json!({"input_file_id": f2.json()["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"});
    let r = post_json(router.addr, "/v1/batches", Some(&other), &[], body.to_string()).await;
    assert_eq!(r.status, 404);
    // A bad line is named at upload, with OpenAI's error shape.
    let bad = format!("{}{{\"custom_id\": \"x\"}}\n", input(1, 2));
    let r = upload(router.addr, &acme, &bad).await;
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("line 2"), "{}", r.json());
    // Windows and endpoints outside what the router serves.
    let body = serde_json::json!({"input_file_id": f2.json()["id"], "endpoint": "/v1/chat/completions", "completion_window": "48h"});
    let r = post_json(router.addr, "/v1/batches", Some(&acme), &[], body.to_string()).await;
    assert_eq!(
        (r.status.as_u16(), r.json()["error"]["param"].as_str()),
        (400, Some("completion_window"))
    );
    router.stop().await;
}

/// A webhook receiver on loopback: records each delivery's headers and body.
struct Receiver {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<(http::HeaderMap, bytes::Bytes)>>>,
    _server: edgeroute_test_util::ServerGuard,
}

async fn receiver(fail_first: usize) -> Receiver {
    let got: Arc<Mutex<Vec<(http::HeaderMap, bytes::Bytes)>>> = Arc::default();
    let seen = got.clone();
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: http::HeaderMap, body: bytes::Bytes| {
            let (seen, calls) = (seen.clone(), calls.clone());
            async move {
                if calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < fail_first {
                    return http::StatusCode::SERVICE_UNAVAILABLE;
                }
                seen.lock().unwrap().push((headers, body));
                http::StatusCode::NO_CONTENT
            }
        }),
    );
    let server = edgeroute_test_util::spawn_router(app).await;
    Receiver { addr: server.addr, got, _server: server }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_async_request_answers_202_then_by_poll_and_by_a_signed_webhook_retried_once_per_id() {
    let f = fleet("async", 5000.0).await;
    let hook = receiver(1).await;
    std::fs::write(f.dir.join("whsec"), "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
    let jobs = format!(
        "webhook_secret_files = [\"{}\"]\nwebhook_allowed_hosts = [\"127.0.0.1\"]\nwebhook_first_delay_ms = 100\n",
        f.dir.join("whsec").display()
    );
    let router = InProcess::start(&f.config("router-tor", &f.sqlite(), &jobs)).await;
    let acme = token("acme");
    let url = format!("http://{}/hook", hook.addr);
    let body = serde_json::json!({"model": "sim-llama", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]});
    let headers = [
        ("prefer", "respond-async"),
        ("x-edgeroute-webhook", url.as_str()),
        ("idempotency-key", "k-1"),
    ];
    let r = post_json(router.addr, "/v1/chat/completions", Some(&acme), &headers, body.to_string())
        .await;
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    let id = r.json()["id"].as_str().unwrap().to_owned();
    assert_eq!(r.header("location"), Some(format!("/v1/async/{id}").as_str()));
    // The same key again: the same request, not a second one.
    let again =
        post_json(router.addr, "/v1/chat/completions", Some(&acme), &headers, body.to_string())
            .await;
    assert_eq!((again.status.as_u16(), again.json()["id"].as_str()), (202, Some(id.as_str())));
    let t = Instant::now();
    let done = loop {
        let p = get(router.addr, &format!("/v1/async/{id}"), Some(&acme)).await;
        assert_eq!(p.status, 200);
        if p.json()["status"] == "completed" {
            break p.json();
        }
        assert!(t.elapsed() < Duration::from_secs(20), "never completed: {}", p.json());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(done["response"]["status_code"], 200);
    assert!(done["response"]["body"]["choices"][0]["message"]["content"].is_string());
    assert_eq!(
        get(router.addr, &format!("/v1/async/{id}"), Some(&token("other"))).await.status,
        404
    );
    // The webhook: refused once (503), delivered on the retry, signed, once.
    let t = Instant::now();
    while hook.got.lock().unwrap().is_empty() {
        assert!(t.elapsed() < Duration::from_secs(10), "no webhook");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = hook.got.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "delivered once");
    let (h, b) = &got[0];
    let v: serde_json::Value = serde_json::from_slice(b).unwrap();
    assert_eq!(
        (v["type"].as_str(), v["data"]["id"].as_str()),
        (Some("async_request.completed"), Some(id.as_str()))
    );
    let secret =
        edgeroute_jobs::webhook::signing::Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
            .unwrap();
    let hv = |k: &str| h.get(k).unwrap().to_str().unwrap().to_owned();
    let now = edgeroute_core::clock::unix_ms() / 1000;
    let signed = edgeroute_jobs::webhook::signing::SignedHeaders {
        id: hv("webhook-id"),
        timestamp: hv("webhook-timestamp"),
        signature: hv("webhook-signature"),
    };
    assert_eq!(signed.id, format!("msg_{id}_completed"));
    edgeroute_jobs::webhook::signing::verify(&[secret], &signed, b, now, 300).unwrap();
    // A target inside the fleet that the operator did not allow is refused at submit.
    let inside = [("prefer", "respond-async"), ("x-edgeroute-webhook", "http://10.0.0.1/x")];
    let r = post_json(router.addr, "/v1/chat/completions", Some(&acme), &inside, body.to_string())
        .await;
    assert_eq!(
        (r.status.as_u16(), r.json()["error"]["code"].as_str()),
        (400, Some("webhook_target_refused"))
    );
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_during_in_flight_items_aborts_them_and_the_counts_add_up() {
    // Slow nodes: 200 tokens at 50 tokens/s keep items in flight for seconds.
    let f = fleet("cancel", 50.0).await;
    let router = InProcess::start(&f.config("router-tor", &f.sqlite(), "workers = 4\n")).await;
    let acme = token("acme");
    let id = create_batch(router.addr, &acme, 20, 200).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let c = post_json(router.addr, &format!("/v1/batches/{id}/cancel"), Some(&acme), &[], "").await;
    assert_eq!(c.status, 200, "{}", String::from_utf8_lossy(&c.body));
    assert!(["cancelling", "cancelled"].contains(&c.json()["status"].as_str().unwrap()));
    let t = Instant::now();
    let b = wait_terminal(&[router.addr], &acme, &id, Duration::from_secs(10)).await;
    assert_eq!(b["status"], "cancelled");
    assert!(t.elapsed() < Duration::from_secs(5), "in-flight items were aborted, not waited for");
    let counts = &b["request_counts"];
    assert_eq!(counts["total"], 20);
    let r = results(router.addr, &acme, &b).await;
    assert_eq!(r.len(), 20, "every item in a file");
    let cancelled = r.values().filter(|(_, c)| c.as_deref() == Some("batch_cancelled")).count();
    assert!(cancelled >= 16, "the queued and in-flight items ended cancelled: {r:?}");
    assert_eq!(counts["completed"].as_u64().unwrap() + counts["failed"].as_u64().unwrap(), 20);
    let m = get(
        router.addr,
        "/metrics",
        Some(&edgeroute_test_util::node::mint_hs256_fleet("op", &[Scope::Admin], 60)),
    )
    .await;
    let text = String::from_utf8_lossy(&m.body).into_owned();
    assert!(
        !text.contains("edgeroute_router_jobs_aborted_total 0\n"),
        "in-flight items were aborted: {text}"
    );
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_killed_mid_batch_and_restarted_on_its_sqlite_file_finishes_every_item_once() {
    // 40 tokens at 100 tokens/s: 0.4 s an item, 24 items on 4 workers, ~2.4 s in all.
    let f = fleet("crash-sqlite", 100.0).await;
    let text = f.config("router-tor", &f.sqlite(), "workers = 4\n");
    let first = Proc::start(&f.dir, "first", &text);
    let acme = token("acme");
    let id = create_batch(first.addr, &acme, 24, 40).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let before = get(first.addr, &format!("/v1/batches/{id}"), Some(&acme)).await.json();
    assert_ne!(before["status"], "completed", "the kill lands mid-batch");
    first.kill();
    let second = Proc::start(&f.dir, "second", &text);
    let b = wait_terminal(&[second.addr], &acme, &id, Duration::from_secs(40)).await;
    assert_eq!(b["status"], "completed");
    assert_eq!(b["request_counts"], serde_json::json!({"total": 24, "completed": 24, "failed": 0}));
    all_ok(24, &results(second.addr, &acme, &b).await);
}

#[allow(clippy::disallowed_methods)] // The test script names the database.
fn postgres() -> Option<String> {
    match std::env::var("EDGEROUTE_TEST_POSTGRES") {
        Ok(u) if !u.is_empty() => Some(u),
        _ if std::env::var("EDGEROUTE_TEST_POSTGRES_SKIP").as_deref() == Ok("1") => None,
        _ => panic!(
            "EDGEROUTE_TEST_POSTGRES is not set: run scripts/test.sh (it starts a PostgreSQL)"
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_postgres_one_killed_mid_batch_the_other_finishes_it_once() {
    let Some(url) = postgres() else { return };
    let f = fleet("crash-pg", 100.0).await;
    let schema = format!("router_jobs_{}", std::process::id());
    let jobs = format!("workers = 3\npostgres_schema = \"{schema}\"\n");
    let a = Proc::start(&f.dir, "a", &f.config("router-a", &url, &jobs));
    let b = Proc::start(&f.dir, "b", &f.config("router-b", &url, &jobs));
    let acme = token("acme");
    let id = create_batch(a.addr, &acme, 24, 40).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let before = get(b.addr, &format!("/v1/batches/{id}"), Some(&acme)).await.json();
    assert_eq!(before["status"], "in_progress", "the kill lands mid-batch");
    let b_addr = b.addr;
    a.kill();
    let done = wait_terminal(&[b_addr], &acme, &id, Duration::from_secs(40)).await;
    assert_eq!(done["status"], "completed");
    assert_eq!(
        done["request_counts"],
        serde_json::json!({"total": 24, "completed": 24, "failed": 0})
    );
    all_ok(24, &results(b_addr, &acme, &done).await);
    drop(b);
    let store =
        edgeroute_jobs::PostgresStore::connect(edgeroute_jobs::PostgresConfig::new(url, schema))
            .await
            .unwrap();
    store.drop_schema().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_larger_than_the_fleet_waits_for_room_spreads_over_the_nodes_and_loses_nothing() {
    // Two slots a node, and more workers than the fleet's four slots: items find every node
    // full (503 fleet_saturated from the SDK), wait and try again without spending attempts.
    // An item holds its slot 0.3 s; a request waits at most 0.3 s for a slot.
    let f = Fleet::start_tuned("saturated", 100.0, (100, 80), |cfg| {
        cfg.limits.max_concurrency = 2;
        cfg.limits.tenant_max_share = 1.0;
    })
    .await;
    let jobs = "workers = 12\nbusy_backoff_ms = 50\n";
    let text = f
        .config("router-tor", &f.sqlite(), "")
        .replace("busy_backoff_ms = 200\n", jobs)
        .replace("region = \"toronto\"\n", "region = \"toronto\"\nfirst_token_timeout_ms = 300\n");
    let router = InProcess::start(&text).await;
    let acme = token("acme");
    let id = create_batch(router.addr, &acme, 40, 30).await;
    let b = wait_terminal(&[router.addr], &acme, &id, Duration::from_secs(60)).await;
    assert_eq!(b["status"], "completed");
    assert_eq!(b["request_counts"], serde_json::json!({"total": 40, "completed": 40, "failed": 0}));
    all_ok(40, &results(router.addr, &acme, &b).await);
    let (tor, mtl) = (f.answered(0).await, f.answered(1).await);
    assert!(tor >= 10 && mtl >= 10, "one node took the batch: tor-1 {tor}, mtl-1 {mtl}");
    let saturated = router_metric(router.addr, "edgeroute_router_jobs_saturated_total").await;
    assert!(saturated > 0, "the fleet was never full");
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_job_costs_no_item() {
    let mut f = fleet("node-kill", 100.0).await;
    let router = InProcess::start(&f.config("router-tor", &f.sqlite(), "workers = 6\n")).await;
    let acme = token("acme");
    let id = create_batch(router.addr, &acme, 24, 40).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    f.relays[0].cut();
    let b = wait_terminal(&[router.addr], &acme, &id, Duration::from_secs(40)).await;
    assert_eq!(b["status"], "completed");
    assert_eq!(b["request_counts"], serde_json::json!({"total": 24, "completed": 24, "failed": 0}));
    all_ok(24, &results(router.addr, &acme, &b).await);
    // The cut landed on items in flight: the SDK moved them (continued or retried elsewhere).
    let failovers = router_metric(router.addr, "edgeroute_router_client_failovers_total").await;
    assert!(failovers > 0, "no item was in flight on the cut node");
    router.stop().await;
}
