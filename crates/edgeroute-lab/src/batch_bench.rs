//! The batch-throughput benchmark (`edgeroute-lab bench batch`): a fleet of simulator nodes
//! whose capacity is known in advance, an `edgeroute discovery` process over them, and an
//! `edgeroute router` with `[jobs]` (SQLite, and PostgreSQL when given) in front; one batch of
//! `items` chat completions goes in through `/v1/files` + `/v1/batches` and is polled until it
//! ends. The report sets the items per second achieved against the fleet's capacity
//! ([`Capacity`]), with the time to the first and to the last item, and checks that every item
//! ended in the output file, once, answered.
//!
//! Each answer is exactly `max_tokens` tokens (the nodes' simulators are told so), prefill
//! costs nothing, so one item holds a slot for `ttft + (max_tokens − 1) / tokens_per_s`: the
//! first token comes at the time to first token, each further one `1 / tokens_per_s` later.
//! The fleet's capacity is its slots over that.
//!
//! Every server is a child process (the `edgeroute` binary), stopped when the run ends.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use bytes::Bytes;
use edgeroute_node::config::BackendConfig;
use http::StatusCode;

use crate::fleet::{FleetAuth, FleetBackend, FleetSpec, NodeSpec};
use crate::gateway_bench::{
    HttpCall, MachineInfo, RouterLimits, finish, http_call, mint_token, start_configured,
    start_router, start_static_discovery, work_dir, write_secret,
};
use crate::process::{ProcessGuard, tree_cpu_ns};

const MODEL: &str = crate::fleet::LLM;

/// The fleet's shape, and so its capacity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Capacity {
    pub nodes: usize,
    /// Concurrency slots of each node's one GPU.
    pub slots: u32,
    /// Decode speed of each slot.
    pub tokens_per_s: f64,
    /// Time to first token once a slot is held, ms.
    pub ttft_ms: u64,
    /// Tokens per answer (every answer is exactly this long).
    pub max_tokens: u32,
}

impl Capacity {
    /// How long one item holds a slot: `ttft + (max_tokens − 1) / tokens_per_s`.
    pub fn item_seconds(&self) -> f64 {
        let decode = if self.tokens_per_s > 0.0 {
            f64::from(self.max_tokens.saturating_sub(1)) / self.tokens_per_s
        } else {
            0.0
        };
        self.ttft_ms as f64 / 1e3 + decode
    }

    /// Items per second the whole fleet completes with every slot busy.
    pub fn items_per_s(&self) -> f64 {
        let slots = self.nodes as f64 * f64::from(self.slots);
        let t = self.item_seconds();
        if t > 0.0 { slots / t } else { f64::INFINITY }
    }

    /// The shortest time `items` can take from the first claim: full waves of every slot,
    /// `ceil(items / slots)` item times.
    pub fn ideal_seconds(&self, items: usize) -> f64 {
        let slots = (self.nodes * self.slots as usize).max(1);
        items.div_ceil(slots) as f64 * self.item_seconds()
    }
}

/// Where `[jobs]` keeps its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Store {
    /// A fresh SQLite file per run.
    Sqlite,
    /// This PostgreSQL server, a fresh schema per run (dropped afterwards with `psql`).
    Postgres(String),
}

impl Store {
    pub fn label(&self) -> &'static str {
        match self {
            Store::Sqlite => "SQLite",
            Store::Postgres(_) => "PostgreSQL",
        }
    }
}

/// What to run. [`BatchBenchOpts::new`] gives the published configuration.
#[derive(Debug, Clone)]
pub struct BatchBenchOpts {
    /// The `edgeroute` binary (`node`, `discovery`, `router`, `token mint`).
    pub edgeroute_bin: PathBuf,
    pub capacity: Capacity,
    /// Items in the batch.
    pub items: usize,
    /// `[jobs] workers` of each run: one run per value and store.
    pub workers: Vec<usize>,
    pub stores: Vec<Store>,
    /// How long one batch may take before the run is failed.
    pub batch_timeout: Duration,
    /// How often the batch is polled (the resolution of the first/last item times).
    pub poll: Duration,
    pub startup_timeout: Duration,
    /// Where configs, logs and the SQLite files go; `None`: a temporary directory.
    pub work_dir: Option<PathBuf>,
    pub command: String,
}

impl BatchBenchOpts {
    /// 2 nodes × 8 slots, 100 tokens/s, 50 ms to first token, 16 tokens an item (0.2 s an
    /// item: 80 items/s), 800 items, workers 16 (the fleet's slots) and 64, SQLite.
    pub fn new(edgeroute_bin: impl Into<PathBuf>) -> Self {
        BatchBenchOpts {
            edgeroute_bin: edgeroute_bin.into(),
            capacity: Capacity {
                nodes: 2,
                slots: 8,
                tokens_per_s: 100.0,
                ttft_ms: 50,
                max_tokens: 16,
            },
            items: 800,
            workers: vec![16, 64],
            stores: vec![Store::Sqlite],
            batch_timeout: Duration::from_secs(300),
            poll: Duration::from_millis(20),
            startup_timeout: Duration::from_secs(20),
            work_dir: None,
            command: String::new(),
        }
    }
}

/// The fleet of the benchmark: `capacity.nodes` simulator nodes `bat-1…` in region `local`,
/// trusting HS256 tokens signed with `secret_file`.
pub fn batch_fleet(capacity: &Capacity, secret_file: &Path) -> FleetSpec {
    FleetSpec {
        nodes: (1..=capacity.nodes)
            .map(|i| NodeSpec::new(&format!("bat-{i}"), "local", capacity.ttft_ms))
            .collect(),
        regions: vec!["local".into()],
        auth: FleetAuth::Hs256File(secret_file.to_owned()),
        backend: FleetBackend::Sim {
            tokens_per_s: capacity.tokens_per_s,
            prefill_us_per_token: 0,
            spare_gpu: false,
        },
        ..FleetSpec::open()
    }
}

/// Node `i`'s config on `listen`: the fleet's, with `capacity.slots` slots on its GPU and
/// every answer exactly `capacity.max_tokens` tokens long.
pub fn batch_node_config(
    fleet: &FleetSpec,
    i: usize,
    listen: SocketAddr,
    capacity: &Capacity,
) -> edgeroute_node::NodeConfig {
    let mut cfg = fleet.node_config(i, None);
    cfg.node.listen = listen;
    if let BackendConfig::Sim { sim } = &mut cfg.backend {
        for g in &mut sim.gpus {
            g.slots = capacity.slots;
        }
        sim.min_answer_tokens = capacity.max_tokens.max(1);
        sim.max_answer_tokens = capacity.max_tokens.max(1);
        // The node admits (and advertises as its capacity) what its GPU slots take, as an
        // operator sets it; the batch's one tenant may use all of it.
        cfg.limits.max_concurrency = capacity.slots * sim.gpus.len().max(1) as u32;
        cfg.limits.tenant_max_share = 1.0;
    }
    cfg
}

/// The body of the router's `[jobs]` section for one run.
pub fn jobs_section(store: &str, schema: Option<&str>, workers: usize, secret: &Path) -> String {
    let q = crate::gateway_bench::toml_string;
    let mut s = format!(
        "store = {}\nworkers = {workers}\ndelegation_key_file = {}\ndelegation_alg = \"hs256\"\n",
        q(store),
        q(&secret.display().to_string())
    );
    if let Some(schema) = schema {
        let _ = writeln!(s, "postgres_schema = {}", q(schema));
    }
    s
}

/// The batch's input file: `items` chat completions, `custom_id` `item-<i>`.
pub fn batch_input(items: usize, max_tokens: u32) -> String {
    let mut out = String::new();
    for i in 0..items {
        let line = serde_json::json!({
            "custom_id": format!("item-{i}"),
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": MODEL,
                "max_tokens": max_tokens,
                "messages": [{"role": "user", "content": format!("Question number {i}?")}],
            },
        });
        out.push_str(&line.to_string());
        out.push('\n');
    }
    out
}

/// `POST /v1/files` as OpenAI's clients send it (multipart, purpose `batch`).
fn multipart_upload(jsonl: &str) -> (String, Bytes) {
    let boundary = "edgeroute-lab-batch-boundary";
    let body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"batch.jsonl\"\r\n\
         Content-Type: application/jsonl\r\n\r\n{jsonl}\r\n--{boundary}--\r\n"
    );
    (format!("multipart/form-data; boundary={boundary}"), Bytes::from(body))
}

/// What the output and error files say, item by item.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileCheck {
    /// Items in the output file, answered 200 with content.
    pub answered: usize,
    /// Lines of the output file that were not a 200 with content.
    pub bad: usize,
    /// Items in the error file.
    pub errors: usize,
    /// `custom_id`s found more than once across both files.
    pub duplicates: usize,
    /// `custom_id`s of the input found in neither file.
    pub missing: usize,
    /// The error file's lines by `error.code` (the code and message of the first of each).
    pub error_codes: BTreeMap<String, (usize, String)>,
}

impl FileCheck {
    pub fn all_answered(&self, items: usize) -> bool {
        self.answered == items && self.bad + self.errors + self.duplicates + self.missing == 0
    }
}

/// Checks the output file (`output`) and error file (`errors`) against `items` inputs
/// `item-0…`.
pub fn check_files(items: usize, output: &str, errors: &str) -> FileCheck {
    let mut seen: BTreeMap<String, u32> = BTreeMap::new();
    let mut check = FileCheck::default();
    for line in output.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
        if let Some(id) = v["custom_id"].as_str() {
            *seen.entry(id.to_owned()).or_default() += 1;
        }
        let ok = v["response"]["status_code"] == 200
            && v["response"]["body"]["choices"][0]["message"]["content"]
                .as_str()
                .is_some_and(|c| !c.is_empty());
        if ok {
            check.answered += 1;
        } else {
            check.bad += 1;
        }
    }
    for line in errors.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
        if let Some(id) = v["custom_id"].as_str() {
            *seen.entry(id.to_owned()).or_default() += 1;
        }
        check.errors += 1;
        let code = v["error"]["code"].as_str().unwrap_or("?").to_owned();
        let message = v["error"]["message"].as_str().unwrap_or_default().to_owned();
        check.error_codes.entry(code).or_insert((0, message)).0 += 1;
    }
    check.duplicates = seen.values().filter(|&&n| n > 1).count();
    check.missing = (0..items).filter(|i| !seen.contains_key(&format!("item-{i}"))).count();
    check
}

/// Sum of a node's `edgeroute_node_requests_total` samples for the chat route answered 200,
/// from its `/metrics` text.
pub fn chat_ok_requests(metrics: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("edgeroute_node_requests_total{"))
        .filter(|l| l.contains("chat") && l.contains("\"200\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// One batch, start to end.
#[derive(Debug, Clone)]
pub struct BatchRun {
    pub store: &'static str,
    pub workers: usize,
    pub items: usize,
    pub status: String,
    pub completed: u64,
    pub failed: u64,
    pub files: FileCheck,
    /// Upload of the input file.
    pub upload: Duration,
    /// From `POST /v1/batches` to the first poll that saw an item done.
    pub first_item: Option<Duration>,
    /// … to the first poll that saw every item done.
    pub last_item: Option<Duration>,
    /// … to the first poll that saw the batch `completed` (output file written).
    pub done: Duration,
    /// Chat completions each node answered during the batch.
    pub per_node: Vec<u64>,
    /// The router process's CPU time per item (user + kernel).
    pub router_cpu_per_item: Option<Duration>,
    pub router_config: String,
}

impl BatchRun {
    /// Items over the time from the batch's creation to its last item.
    pub fn items_per_s(&self) -> Option<f64> {
        let t = self.last_item?.as_secs_f64();
        (t > 0.0).then(|| self.items as f64 / t)
    }

    /// Items after the first over the time between the first and the last: the rate once
    /// the workers run.
    pub fn steady_items_per_s(&self) -> Option<f64> {
        let t = (self.last_item? - self.first_item?).as_secs_f64();
        (t > 0.0 && self.items > 1).then(|| (self.items - 1) as f64 / t)
    }
}

/// Everything measured.
#[derive(Debug, Clone)]
pub struct BatchBenchReport {
    pub machine: MachineInfo,
    pub command: String,
    pub capacity: Capacity,
    pub items: usize,
    pub poll: Duration,
    pub runs: Vec<BatchRun>,
    pub node_config: String,
    pub discovery_config: String,
}

/// Runs the benchmark; every child process is stopped before it returns.
pub async fn run(opts: BatchBenchOpts) -> anyhow::Result<BatchBenchReport> {
    let c = &opts.capacity;
    ensure!(c.nodes > 0 && c.slots > 0 && c.max_tokens > 0, "nodes, slots and max_tokens > 0");
    ensure!(c.tokens_per_s > 0.0 && c.tokens_per_s.is_finite(), "tokens_per_s > 0");
    ensure!(
        opts.items > 0 && !opts.workers.is_empty() && !opts.stores.is_empty(),
        "nothing to run"
    );
    ensure!(opts.workers.iter().all(|&w| w > 0), "workers > 0");
    let machine = MachineInfo::detect().await;
    let (temp, dir) = work_dir(opts.work_dir.as_deref(), "edgeroute-batchbench-")?;
    let mut guard = ProcessGuard::new();
    let result = run_with(&opts, &dir, &mut guard, machine).await;
    finish(guard, temp, result).await
}

async fn run_with(
    opts: &BatchBenchOpts,
    dir: &Path,
    guard: &mut ProcessGuard,
    machine: MachineInfo,
) -> anyhow::Result<BatchBenchReport> {
    let bin = &opts.edgeroute_bin;
    let cap = opts.capacity;
    let secret = dir.join("hs256.secret");
    write_secret(&secret)?;
    let token = mint_token(bin, &secret).await?;
    let fleet = batch_fleet(&cap, &secret);

    let mut node_addrs = Vec::new();
    let mut node_config = String::new();
    for i in 0..cap.nodes {
        let name = format!("node-{}", i + 1);
        let started = start_configured(guard, dir, bin, &name, opts.startup_timeout, |addr| {
            toml::to_string(&batch_node_config(&fleet, i, addr, &cap))
                .context("writing a node's config")
        })
        .await?;
        if i == 0 {
            node_config = started.config;
        }
        let addr = started.addr;
        node_addrs.push(addr);
    }
    let urls: Vec<String> = node_addrs.iter().map(|a| format!("http://{a}")).collect();
    let disc =
        start_static_discovery(guard, dir, bin, &fleet, &urls, MODEL, &token, opts.startup_timeout)
            .await?;

    let input = batch_input(opts.items, cap.max_tokens);
    let mut runs = Vec::new();
    let mut n = 0;
    for store in &opts.stores {
        for &workers in &opts.workers {
            n += 1;
            let (store_url, schema) = match store {
                Store::Sqlite => {
                    (format!("sqlite:{}", dir.join(format!("jobs-{n}.db")).display()), None)
                }
                Store::Postgres(url) => {
                    (url.clone(), Some(format!("edgeroute_batchbench_{}_{n}", std::process::id())))
                }
            };
            let jobs = jobs_section(&store_url, schema.as_deref(), workers, &secret);
            let limits = RouterLimits::OUT_OF_THE_WAY;
            let router = start_router(
                guard,
                dir,
                bin,
                disc.addr,
                &secret,
                limits,
                Some(&jobs),
                opts.startup_timeout,
            )
            .await?;
            let run = one_batch(opts, &node_addrs, router.addr, router.pid, &token, &input).await;
            guard.stop("router");
            if let (Store::Postgres(url), Some(schema)) = (store, &schema) {
                drop_schema(url, schema).await;
            }
            let mut run =
                run.with_context(|| format!("{} with {workers} workers", store.label()))?;
            run.store = store.label();
            run.workers = workers;
            run.router_config = router.config;
            eprintln!(
                "batch bench: {} workers {}: {} items, last item at {:?}, {:.1} items/s",
                store.label(),
                workers,
                run.items,
                run.last_item,
                run.items_per_s().unwrap_or(0.0)
            );
            runs.push(run);
        }
    }
    Ok(BatchBenchReport {
        machine,
        command: opts.command.clone(),
        capacity: cap,
        items: opts.items,
        poll: opts.poll,
        runs,
        node_config,
        discovery_config: disc.config,
    })
}

/// `DROP SCHEMA … CASCADE` through `psql` (the lab has no PostgreSQL client of its own).
async fn drop_schema(url: &str, schema: &str) {
    let mut cmd = tokio::process::Command::new("psql");
    cmd.arg(url).arg("-q").arg("-c").arg(format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"));
    match cmd.kill_on_drop(true).output().await {
        Ok(out) if out.status.success() => {}
        Ok(out) => eprintln!(
            "batch bench: dropping schema {schema} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => eprintln!("batch bench: psql not run ({e}); drop schema {schema} by hand"),
    }
}

async fn call(
    addr: SocketAddr,
    method: http::Method,
    path: &str,
    token: &str,
    body: Option<(&str, Bytes)>,
) -> anyhow::Result<serde_json::Value> {
    let mut c = HttpCall::new(method.clone(), path);
    c.bearer = Some(token);
    if let Some((ct, b)) = body {
        c.content_type = Some(ct);
        c.body = b;
    }
    let (status, bytes) = http_call(addr, c, Duration::from_secs(30))
        .await
        .with_context(|| format!("{method} {path}: no answer"))?;
    ensure!(
        status == StatusCode::OK,
        "{method} {path}: {status} {}",
        String::from_utf8_lossy(&bytes)
    );
    serde_json::from_slice(&bytes).with_context(|| format!("{method} {path}: not JSON"))
}

async fn file_text(addr: SocketAddr, token: &str, id: Option<&str>) -> anyhow::Result<String> {
    let Some(id) = id else { return Ok(String::new()) };
    let path = format!("/v1/files/{id}/content");
    let mut c = HttpCall::new(http::Method::GET, &path);
    c.bearer = Some(token);
    let (status, bytes) =
        http_call(addr, c, Duration::from_secs(60)).await.context("file content: no answer")?;
    ensure!(status == StatusCode::OK, "GET {path}: {status}");
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

async fn node_counts(nodes: &[SocketAddr]) -> Vec<u64> {
    let mut out = Vec::new();
    for &n in nodes {
        let got =
            http_call(n, HttpCall::new(http::Method::GET, "/metrics"), Duration::from_secs(5))
                .await
                .map_or(0, |(_, b)| chat_ok_requests(&String::from_utf8_lossy(&b)));
        out.push(got);
    }
    out
}

async fn one_batch(
    opts: &BatchBenchOpts,
    nodes: &[SocketAddr],
    router: SocketAddr,
    router_pid: u32,
    token: &str,
    input: &str,
) -> anyhow::Result<BatchRun> {
    let before = node_counts(nodes).await;
    let t = Instant::now();
    let (ct, body) = multipart_upload(input);
    let file = call(router, http::Method::POST, "/v1/files", token, Some((&ct, body))).await?;
    let upload = t.elapsed();
    let file_id = file["id"].as_str().context("the upload has no id")?.to_owned();
    let create = serde_json::json!({
        "input_file_id": file_id,
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    });
    let cpu_before = tree_cpu_ns(router_pid);
    let start = Instant::now();
    let batch = call(
        router,
        http::Method::POST,
        "/v1/batches",
        token,
        Some(("application/json", Bytes::from(create.to_string()))),
    )
    .await?;
    let id = batch["id"].as_str().context("the batch has no id")?.to_owned();
    let path = format!("/v1/batches/{id}");
    let (mut first_item, mut last_item) = (None, None);
    let total = opts.items as u64;
    let b = loop {
        let b = call(router, http::Method::GET, &path, token, None).await?;
        let counts = &b["request_counts"];
        let ended =
            counts["completed"].as_u64().unwrap_or(0) + counts["failed"].as_u64().unwrap_or(0);
        if ended >= 1 && first_item.is_none() {
            first_item = Some(start.elapsed());
        }
        if ended >= total && last_item.is_none() {
            last_item = Some(start.elapsed());
        }
        let status = b["status"].as_str().unwrap_or_default();
        if ["completed", "failed", "expired", "cancelled"].contains(&status) {
            break b;
        }
        ensure!(
            start.elapsed() < opts.batch_timeout,
            "batch {id} still {status} after {:?} ({counts})",
            opts.batch_timeout
        );
        tokio::time::sleep(opts.poll).await;
    };
    let done = start.elapsed();
    let cpu = cpu_before.zip(tree_cpu_ns(router_pid)).map(|(a, b)| b.saturating_sub(a));
    let after = node_counts(nodes).await;
    let output = file_text(router, token, b["output_file_id"].as_str()).await?;
    let errors = file_text(router, token, b["error_file_id"].as_str()).await?;
    let counts = &b["request_counts"];
    Ok(BatchRun {
        store: "",
        workers: 0,
        items: opts.items,
        status: b["status"].as_str().unwrap_or("?").to_owned(),
        completed: counts["completed"].as_u64().unwrap_or(0),
        failed: counts["failed"].as_u64().unwrap_or(0),
        files: check_files(opts.items, &output, &errors),
        upload,
        first_item,
        last_item,
        done,
        per_node: after.iter().zip(&before).map(|(a, b)| a.saturating_sub(*b)).collect(),
        router_cpu_per_item: cpu.map(|ns| Duration::from_nanos(ns / total.max(1))),
        router_config: String::new(),
    })
}

fn secs(d: Option<Duration>) -> String {
    d.map_or("—".into(), |d| format!("{:.2} s", d.as_secs_f64()))
}

impl BatchBenchReport {
    /// The report as Markdown, ready for BENCHMARKS.md.
    pub fn to_markdown(&self) -> String {
        let mut md = String::new();
        let m = &self.machine;
        let c = &self.capacity;
        let _ = writeln!(md, "# Batch throughput through the router\n");
        let _ = writeln!(
            md,
            "- **Machine**: {} cores (`nproc`), kernel `{}`, CPU: {}. The nodes, discovery, the router, its store and the poller share them.",
            m.nproc, m.kernel, m.cpu
        );
        if !self.command.is_empty() {
            let _ = writeln!(md, "- **Command**: `{}`", self.command);
        }
        let _ = writeln!(
            md,
            "- **Fleet**: {} simulator nodes (`edgeroute node`, HS256 auth) × {} slots, {} tokens/s per slot, {} ms to first token, no prefill cost, every answer exactly {} tokens: an item holds a slot {:.3} s (ttft + (max_tokens − 1) / tokens_per_s), so the fleet's capacity is **{:.1} items/s**; {} items take at least {:.2} s ({} full waves).",
            c.nodes,
            c.slots,
            c.tokens_per_s,
            c.ttft_ms,
            c.max_tokens,
            c.item_seconds(),
            c.items_per_s(),
            self.items,
            c.ideal_seconds(self.items),
            self.items.div_ceil((c.nodes * c.slots as usize).max(1)),
        );
        let _ = writeln!(
            md,
            "- **Path**: one `edgeroute discovery` process over the nodes (static `[[nodes]]`), one `edgeroute router` with `[jobs]` (a fresh store per run), limits out of the way; the batch: `POST /v1/files` (multipart JSONL, {} items) then `POST /v1/batches`, polled every {} ms with `GET /v1/batches/{{id}}` (so the times below are ±{} ms).",
            self.items,
            self.poll.as_millis(),
            self.poll.as_millis()
        );
        let _ = writeln!(
            md,
            "- **Times** from `POST /v1/batches`: first item = the first poll with an item done; last item = the first poll with every item done; batch completed = the first poll that saw status `completed` (output file written); items/s = items ÷ last item; steady = (items − 1) ÷ (last − first). Items per node: each node's chat completions answered 200 during the batch (its `/metrics`). Router CPU / item: the router process's CPU time from `POST /v1/batches` to the end, over the items, so it includes answering the polls.\n"
        );
        let _ = writeln!(
            md,
            "| store | workers | status | first item | last item | batch completed | items/s | steady items/s | ÷ capacity | items per node | router CPU / item | every item in the output file |"
        );
        let _ = writeln!(md, "|---|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---|");
        for r in &self.runs {
            let ratio = r
                .items_per_s()
                .map_or("—".into(), |x| format!("{:.0} %", 100.0 * x / c.items_per_s()));
            let f = &r.files;
            let files = if f.all_answered(r.items) {
                format!("yes ({} of {}, once each)", f.answered, r.items)
            } else {
                let codes: Vec<String> = f
                    .error_codes
                    .iter()
                    .map(|(code, (n, message))| format!("{n}× `{code}`: {message}"))
                    .collect();
                format!(
                    "**no**: {} answered, {} bad, {} in the error file{}, {} twice, {} missing",
                    f.answered,
                    f.bad,
                    f.errors,
                    if codes.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", codes.join("; "))
                    },
                    f.duplicates,
                    f.missing
                )
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {ratio} | {} | {} | {files} |",
                r.store,
                r.workers,
                r.status,
                secs(r.first_item),
                secs(r.last_item),
                secs(Some(r.done)),
                r.items_per_s().map_or("—".into(), |x| format!("{x:.1}")),
                r.steady_items_per_s().map_or("—".into(), |x| format!("{x:.1}")),
                r.per_node.iter().map(u64::to_string).collect::<Vec<_>>().join(" / "),
                r.router_cpu_per_item.map_or("—".into(), |d| format!("{} µs", d.as_micros())),
            );
        }
        let _ = writeln!(md);
        let _ = writeln!(
            md,
            "Upload of the input file: {}.\n",
            self.runs
                .iter()
                .map(|r| format!("{} {} workers {} ms", r.store, r.workers, r.upload.as_millis()))
                .collect::<Vec<_>>()
                .join("; ")
        );
        let _ = writeln!(md, "## Configurations\n");
        let _ = writeln!(md, "Node 1 (`node-1.toml`):\n\n```toml\n{}```\n", self.node_config);
        let _ = writeln!(
            md,
            "Discovery (`discovery.toml`):\n\n```toml\n{}```\n",
            self.discovery_config
        );
        if let Some(r) = self.runs.last() {
            let _ = writeln!(
                md,
                "Router (`router.toml`, last run):\n\n```toml\n{}```",
                r.router_config
            );
        }
        md
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

    use super::*;

    #[test]
    fn capacity_is_slots_over_the_time_an_item_holds_one() {
        let c = Capacity { nodes: 2, slots: 8, tokens_per_s: 100.0, ttft_ms: 50, max_tokens: 16 };
        assert!((c.item_seconds() - 0.2).abs() < 1e-9);
        assert!((c.items_per_s() - 80.0).abs() < 1e-9);
        // 800 items in waves of 16: 50 waves of 0.2 s.
        assert!((c.ideal_seconds(800) - 10.0).abs() < 1e-9);
        assert!((c.ideal_seconds(801) - 10.2).abs() < 1e-9);
        let one = Capacity { max_tokens: 1, ..c };
        assert!((one.item_seconds() - 0.05).abs() < 1e-9);
    }

    #[test]
    fn node_configs_have_the_slots_and_exact_answer_lengths() {
        let c = Capacity { nodes: 2, slots: 6, tokens_per_s: 100.0, ttft_ms: 40, max_tokens: 12 };
        let fleet = batch_fleet(&c, Path::new("/tmp/secret"));
        assert_eq!(fleet.nodes.len(), 2);
        let cfg = batch_node_config(&fleet, 1, "127.0.0.1:4100".parse().unwrap(), &c);
        cfg.validate().unwrap();
        assert_eq!(cfg.node.id, "bat-2");
        assert_eq!(cfg.node.listen, "127.0.0.1:4100".parse().unwrap());
        let BackendConfig::Sim { sim } = &cfg.backend else { panic!("a sim backend") };
        sim.validate().unwrap();
        assert_eq!(sim.gpus[0].slots, 6);
        assert_eq!((sim.min_answer_tokens, sim.max_answer_tokens), (12, 12));
        assert_eq!((sim.ttft_base_ms, sim.prefill_us_per_token), (40, 0));
        assert!(cfg.auth.is_some());
        let text = toml::to_string(&cfg).unwrap();
        edgeroute_node::NodeConfig::parse(&text, |_| None).unwrap();
    }

    #[test]
    fn the_jobs_section_names_store_workers_and_delegation() {
        let s =
            jobs_section("postgres://u@127.0.0.1:5432/test", Some("bench_1"), 32, Path::new("/s"));
        let v: toml::Value = toml::from_str(&s).unwrap();
        assert_eq!(v["store"].as_str(), Some("postgres://u@127.0.0.1:5432/test"));
        assert_eq!(v["workers"].as_integer(), Some(32));
        assert_eq!(v["delegation_key_file"].as_str(), Some("/s"));
        assert_eq!(v["delegation_alg"].as_str(), Some("hs256"));
        assert_eq!(v["postgres_schema"].as_str(), Some("bench_1"));
        let s = jobs_section("sqlite:/tmp/j.db", None, 8, Path::new("/s"));
        assert!(toml::from_str::<toml::Value>(&s).unwrap().get("postgres_schema").is_none());
    }

    #[test]
    fn the_input_has_one_line_per_item() {
        let text = batch_input(3, 16);
        let lines: Vec<serde_json::Value> =
            text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[2]["custom_id"], "item-2");
        assert_eq!(lines[0]["url"], "/v1/chat/completions");
        assert_eq!(lines[0]["body"]["max_tokens"], 16);
        let (ct, body) = multipart_upload(&text);
        assert!(ct.starts_with("multipart/form-data; boundary="));
        assert!(String::from_utf8_lossy(&body).contains("name=\"purpose\"\r\n\r\nbatch\r\n"));
    }

    #[test]
    fn file_checks_count_answers_errors_duplicates_and_missing_items() {
        let ok = |i: usize| {
            format!(
                r#"{{"custom_id":"item-{i}","response":{{"status_code":200,"body":{{"choices":[{{"message":{{"content":"hi"}}}}]}}}}}}"#
            )
        };
        let all = (0..3).map(ok).collect::<Vec<_>>().join("\n");
        let c = check_files(3, &all, "");
        assert!(c.all_answered(3), "{c:?}");
        let partial = format!(
            "{}\n{}\n{}",
            ok(0),
            ok(0),
            r#"{"custom_id":"item-1","response":{"status_code":500,"body":{}}}"#
        );
        let errors = r#"{"custom_id":"item-1","error":{"code":"x","message":"m"}}"#;
        let c = check_files(4, &partial, errors);
        let codes = BTreeMap::from([("x".to_owned(), (1, "m".to_owned()))]);
        assert_eq!(
            c,
            FileCheck {
                answered: 2,
                bad: 1,
                errors: 1,
                duplicates: 2,
                missing: 2,
                error_codes: codes
            }
        );
        assert!(!c.all_answered(4));
    }

    #[test]
    fn chat_requests_are_read_from_the_node_metrics() {
        let text = "# TYPE edgeroute_node_requests counter\n\
            edgeroute_node_requests_total{route=\"chat\",status=\"200\"} 41\n\
            edgeroute_node_requests_total{route=\"chat\",status=\"429\"} 3\n\
            edgeroute_node_requests_total{route=\"models\",status=\"200\"} 7\n";
        assert_eq!(chat_ok_requests(text), 41);
    }

    #[test]
    fn markdown_sets_items_per_second_against_capacity() {
        let c = Capacity { nodes: 2, slots: 8, tokens_per_s: 100.0, ttft_ms: 50, max_tokens: 16 };
        let run = BatchRun {
            store: "SQLite",
            workers: 16,
            items: 800,
            status: "completed".into(),
            completed: 800,
            failed: 0,
            files: FileCheck { answered: 800, ..FileCheck::default() },
            upload: Duration::from_millis(30),
            first_item: Some(Duration::from_millis(250)),
            last_item: Some(Duration::from_secs(20)),
            done: Duration::from_millis(20_100),
            per_node: vec![400, 400],
            router_cpu_per_item: Some(Duration::from_micros(900)),
            router_config: "[router]\n".into(),
        };
        assert_eq!(run.items_per_s(), Some(40.0));
        let r = BatchBenchReport {
            machine: MachineInfo { nproc: 2, kernel: "k".into(), cpu: "c".into() },
            command: "edgeroute-lab bench batch".into(),
            capacity: c,
            items: 800,
            poll: Duration::from_millis(20),
            runs: vec![run],
            node_config: "[node]\n".into(),
            discovery_config: "[discovery]\n".into(),
        };
        let md = r.to_markdown();
        assert!(md.contains("capacity is **80.0 items/s**"), "{md}");
        assert!(md.contains("at least 10.00 s (50 full waves)"), "{md}");
        let row = md.lines().find(|l| l.starts_with("| SQLite | 16 |")).unwrap();
        assert!(row.contains("| 0.25 s | 20.00 s | 20.10 s | 40.0 | 40.5 | 50 % | 400 / 400 | 900 µs | yes (800 of 800, once each) |"), "{row}");
    }
}
