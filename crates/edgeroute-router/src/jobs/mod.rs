//! Async jobs (`[jobs]`): OpenAI's Batch API and single async requests, run by the router on
//! the tenant's behalf. The store ([`edgeroute_jobs`]) is the truth; this module is the
//! replica's I/O around it:
//!
//! - **workers** claim items (`claim` with a lease), run each through the same front as a
//!   synchronous request — the SDK's ladder, a `batch`-class admission place (so interactive
//!   traffic goes first and items are paced by the fleet's spare capacity), a short-lived token
//!   signed for the tenant with its residency and claims (the submitting token may be long
//!   expired) — renew the lease at a third of its length, and `complete` with the fencing token
//!   they got. The fleet out of capacity gives the item back (`Aborted` outside a cancel
//!   requeues it) and pauses claims for `busy_backoff_ms`.
//! - **cancel** persists `cancelling` first (the store), then aborts the in-flight items: the
//!   ones this replica runs at once, the others' through NATS (`nats_url`) — or, without NATS,
//!   at their next lease renewal, which the store refuses with `Cancelling`.
//! - **the ticker** (`tick_ms`) applies time (lapsed leases of dead replicas go back to the
//!   queue, expiry), finalizes what is ready, and enqueues the job's webhook.
//! - **webhooks** leave through the store's outbox, signed per Standard Webhooks with every
//!   configured secret, to targets checked against the allow-list at submit and at every
//!   connection (each resolved address; [`webhook`]).
//!
//! Invariants (tests in `tests/jobs.rs`): every item ends once, in the output or the error
//! file, through a replica crash (SQLite: restart; PostgreSQL: the other replica re-claims
//! after the lease) — `a_router_killed_mid_batch_…`; a cancel's counts add up and in-flight
//! items are aborted — `cancel_during_in_flight_items_…`; a tenant sees only its own files
//! and jobs — `tenants_see_only_their_own_…`.

pub mod api;
pub mod store;
pub mod webhook;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::body::Body;
use edgeroute_auth::{MintOptions, Scope, Scopes, SigningKey};
use edgeroute_jobs::webhook::signing::Secret;
use edgeroute_jobs::webhook::target::TargetPolicy;
use edgeroute_jobs::{
    ItemError, Job, JobKind, JobStore, Lease, NewWebhook, Outcome, StoreError, UnixMs,
};
use http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, oneshot};

use crate::admission::{Class, Refusal};
use crate::config::JobsSection;
use crate::{PRIORITY_HEADER, Shared};

pub use store::AnyStore;

/// What the router keeps in a job's opaque `metadata`: what it needs to run the items later
/// and to answer in OpenAI's shapes.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct JobMeta {
    /// OpenAI's `metadata` map, as the client gave it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
    /// As asked (`24h`).
    pub completion_window: String,
    /// Where the job's end is reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<String>,
    /// The submitting token's residency and routing claims: the delegated tokens repeat them,
    /// so residency holds for every item, whenever it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jurisdictions: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regions: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claims: Option<std::collections::BTreeMap<String, String>>,
}

impl JobMeta {
    pub fn parse(job: &Job) -> JobMeta {
        job.metadata.as_deref().and_then(|m| serde_json::from_str(m).ok()).unwrap_or_default()
    }
}

/// Counters `/metrics` reports.
#[derive(Debug, Default)]
pub struct JobCounters {
    pub claimed: AtomicU64,
    pub succeeded: AtomicU64,
    pub failed: AtomicU64,
    pub requeued: AtomicU64,
    /// Tries of an item the fleet had no room for (waited and tried again, no attempt spent).
    pub saturated: AtomicU64,
    pub aborted: AtomicU64,
    pub stale: AtomicU64,
    pub webhooks_sent: AtomicU64,
    pub webhooks_failed: AtomicU64,
}

/// The replica's job machinery.
pub struct Jobs {
    pub store: AnyStore,
    pub cfg: JobsSection,
    /// This replica's worker name in leases: `<router id>-<random>` (a restarted replica is
    /// a new worker; its predecessor's leases lapse).
    worker: String,
    delegation: Option<Delegation>,
    secrets: Vec<Secret>,
    pub targets: TargetPolicy,
    /// Abort signals of the items this replica runs, by (job, item).
    running: Mutex<HashMap<(String, u64), oneshot::Sender<()>>>,
    wake: Notify,
    /// The webhook loop's own wake-up (a `Notify` wakes one waiter).
    hook_wake: Notify,
    nats: Option<async_nats::Client>,
    pub counters: JobCounters,
    hooks: webhook::Sender,
}

/// Signs the tenant's short-lived tokens, and keeps each for half its life.
struct Delegation {
    key: SigningKey,
    kid: Option<String>,
    ttl_s: u64,
    iss: String,
    cache: Mutex<HashMap<String, (Arc<str>, u64)>>,
}

#[derive(Debug, thiserror::Error)]
pub enum JobsError {
    #[error("jobs store: {0}")]
    Store(#[from] StoreError),
    #[error("jobs.delegation_key_file {path}: {message}")]
    Key { path: String, message: String },
    #[error("jobs.webhook_secret_files {path}: {message}")]
    Secret { path: String, message: String },
    #[error("jobs.nats_url: {0}")]
    Nats(String),
    #[error("jobs webhooks: {0}")]
    Webhook(String),
}

fn now_ms() -> UnixMs {
    edgeroute_core::clock::unix_ms()
}

/// NATS subjects (per store schema, so two fleets on one NATS do not cross).
fn subject(cfg: &JobsSection, what: &str) -> String {
    let prefix = edgeroute_bus::credentials::JOBS_SUBJECT_PREFIX;
    format!("{prefix}.{}.{what}", cfg.postgres_schema)
}

#[derive(Serialize, Deserialize)]
struct AbortMsg {
    job_id: String,
    item: u64,
}

impl Jobs {
    /// Opens the store. `bus_nats`: the `[bus]` NATS connection (its identity), used for
    /// wake-ups and cancel fan-out in preference to `nats_url`.
    pub async fn open(
        cfg: JobsSection,
        router_id: &str,
        bus_nats: Option<async_nats::Client>,
    ) -> Result<Jobs, JobsError> {
        let store = AnyStore::open(&cfg.store, &cfg.postgres_schema).await?;
        let delegation = match &cfg.delegation_key_file {
            None => None,
            Some(path) => {
                let err =
                    |message: String| JobsError::Key { path: path.display().to_string(), message };
                let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
                let key = match cfg.delegation_alg.as_str() {
                    "hs256" => SigningKey::Hs256(text.trim_end().as_bytes().to_vec()),
                    "rs256" => SigningKey::Rs256 { pem: text },
                    _ => SigningKey::EdDsa { pem: text },
                };
                Some(Delegation {
                    key,
                    kid: cfg.delegation_kid.clone(),
                    ttl_s: cfg.delegation_ttl_s,
                    iss: format!("edgeroute-router:{router_id}"),
                    cache: Mutex::new(HashMap::new()),
                })
            }
        };
        let mut secrets = Vec::new();
        for path in &cfg.webhook_secret_files {
            let err =
                |message: String| JobsError::Secret { path: path.display().to_string(), message };
            let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
            secrets.push(Secret::parse(text.trim()).map_err(|e| err(e.to_string()))?);
        }
        let targets = TargetPolicy {
            allowed_hosts: cfg
                .webhook_allowed_hosts
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
        };
        let nats = match (bus_nats, &cfg.nats_url) {
            (Some(client), _) => Some(client),
            (None, None) => None,
            (None, Some(url)) => Some(
                async_nats::connect(url.as_str())
                    .await
                    .map_err(|e| JobsError::Nats(e.to_string()))?,
            ),
        };
        let hooks =
            webhook::Sender::new(targets.clone(), Duration::from_millis(cfg.webhook_timeout_ms))
                .map_err(JobsError::Webhook)?;
        let worker = format!("{router_id}-{:08x}", rand::random::<u32>());
        Ok(Jobs {
            store,
            cfg,
            worker,
            delegation,
            secrets,
            targets,
            running: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            hook_wake: Notify::new(),
            nats,
            counters: JobCounters::default(),
            hooks,
        })
    }

    /// Work was added: this replica's workers look now; the others through NATS.
    pub async fn wake(&self) {
        self.wake.notify_one();
        if let Some(n) = &self.nats {
            let _ = n.publish(subject(&self.cfg, "wake"), "".into()).await;
        }
    }

    /// Aborts in-flight items: those this replica runs now, and (NATS) the others'.
    pub async fn abort(&self, aborts: &[edgeroute_jobs::Abort]) {
        for a in aborts {
            self.abort_local(&a.job_id, a.item);
            if let Some(n) = &self.nats {
                let msg = AbortMsg { job_id: a.job_id.clone(), item: a.item };
                if let Ok(body) = serde_json::to_vec(&msg) {
                    let _ = n.publish(subject(&self.cfg, "abort"), body.into()).await;
                }
            }
        }
    }

    fn abort_local(&self, job_id: &str, item: u64) {
        let tx = self
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&(job_id.to_owned(), item));
        if let Some(tx) = tx {
            let _ = tx.send(());
        }
    }

    /// The token an item of `meta`'s tenant runs with (`None` without `[auth]`).
    fn bearer(&self, tenant: &str, meta: &JobMeta) -> Result<Option<Arc<str>>, ItemError> {
        let Some(d) = &self.delegation else { return Ok(None) };
        let residency = match (&meta.jurisdictions, &meta.regions) {
            (None, None) => None,
            (j, r) => {
                Some(edgeroute_auth::Residency { jurisdictions: j.clone(), regions: r.clone() })
            }
        };
        let claims = meta.claims.clone().unwrap_or_default();
        let key = serde_json::json!([tenant, meta.jurisdictions, meta.regions, claims]).to_string();
        let now_s = now_ms() / 1000;
        let mut cache = d.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((t, exp)) = cache.get(&key)
            && *exp > now_s + d.ttl_s / 2
        {
            return Ok(Some(t.clone()));
        }
        let mut scopes = Scopes::default();
        scopes.insert(Scope::Inference);
        let token = edgeroute_auth::mint(
            &d.key,
            &MintOptions {
                sub: tenant.to_owned(),
                scopes,
                aud: None,
                iss: Some(d.iss.clone()),
                ttl_s: d.ttl_s,
                now_unix_s: now_s,
                kid: d.kid.clone(),
                nbf: None,
                residency,
                claims,
            },
        )
        .map_err(|e| ItemError { code: "delegation_failed".into(), message: e.to_string() })?;
        let token: Arc<str> = Arc::from(token);
        if cache.len() > 10_000 {
            cache.retain(|_, (_, exp)| *exp > now_s + d.ttl_s / 2);
        }
        cache.insert(key, (token.clone(), now_s + d.ttl_s));
        Ok(Some(token))
    }

    /// Writes the job's files and terminal status, then its webhook (once per job end: the
    /// message id is the job's and its status).
    pub async fn finalize(&self, job_id: &str) -> Result<Job, StoreError> {
        let job = self.store.finalize(job_id, now_ms()).await?;
        self.enqueue_webhook(&job).await;
        Ok(job)
    }

    async fn enqueue_webhook(&self, job: &Job) {
        if !job.status.is_terminal() {
            return;
        }
        let meta = JobMeta::parse(job);
        let Some(url) = meta.webhook else { return };
        let status = job.status.as_str();
        let kind = match job.kind {
            JobKind::Batch => "batch",
            JobKind::Single => "async_request",
        };
        let id = format!("msg_{}_{status}", job.id);
        let at = job.finished_at.unwrap_or_else(now_ms) / 1000;
        let body = serde_json::json!({
            "object": "event",
            "id": id,
            "type": format!("{kind}.{status}"),
            "created_at": at,
            "data": { "id": job.id, "status": status },
        })
        .to_string();
        let hook = NewWebhook { id, job_id: job.id.clone(), url, body };
        if let Err(e) = self.store.enqueue_webhook(hook, now_ms()).await {
            tracing::warn!(job = %job.id, error = %e, "webhook not enqueued");
        }
        self.hook_wake.notify_one();
    }
}

/// Starts the replica's job loops: workers, the ticker, webhook delivery, NATS listeners. They
/// end when `stop` is set.
pub(crate) fn spawn(
    sh: Arc<Shared>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let Some(jobs) = sh.jobs.clone() else { return vec![] };
    let mut tasks = vec![
        tokio::spawn(work(sh.clone(), jobs.clone(), stop.clone())),
        tokio::spawn(tick(jobs.clone(), stop.clone())),
        tokio::spawn(webhook::deliver_loop(jobs.clone(), stop.clone())),
    ];
    if let Some(n) = jobs.nats.clone() {
        tasks.push(tokio::spawn(listen(jobs, n, stop)));
    }
    tasks
}

async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// NATS: wake-ups and aborts from the other replicas.
async fn listen(
    jobs: Arc<Jobs>,
    nats: async_nats::Client,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    use futures_util::StreamExt;
    let (Ok(mut wake), Ok(mut abort)) = (
        nats.subscribe(subject(&jobs.cfg, "wake")).await,
        nats.subscribe(subject(&jobs.cfg, "abort")).await,
    ) else {
        tracing::warn!("jobs: NATS subscriptions failed; replicas poll every tick");
        return;
    };
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => return,
            Some(_) = wake.next() => jobs.wake.notify_one(),
            Some(m) = abort.next() => {
                if let Ok(a) = serde_json::from_slice::<AbortMsg>(&m.payload) {
                    jobs.abort_local(&a.job_id, a.item);
                }
            }
            else => return,
        }
    }
}

/// Applies time every `tick_ms`: lapsed leases, expiry, finalizing.
async fn tick(jobs: Arc<Jobs>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let every = Duration::from_millis(jobs.cfg.tick_ms);
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => return,
            _ = tokio::time::sleep(every) => {}
        }
        match jobs.store.tick(now_ms()).await {
            Ok(report) => {
                jobs.abort(&report.aborts).await;
                for id in report.expired {
                    if let Ok(Some(job)) = jobs.store.job(&id).await {
                        jobs.enqueue_webhook(&job).await;
                    }
                }
                for id in report.ready {
                    if let Err(e) = jobs.finalize(&id).await {
                        tracing::warn!(job = %id, error = %e, "finalize failed; next tick retries");
                    }
                }
                if report.lapsed > 0 {
                    jobs.wake.notify_one();
                }
            }
            Err(e) => tracing::warn!(error = %e, "jobs tick failed"),
        }
    }
}

/// Claims and runs items, at most `workers` at once.
async fn work(sh: Arc<Shared>, jobs: Arc<Jobs>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(jobs.cfg.workers));
    let poll = Duration::from_millis(jobs.cfg.tick_ms);
    let busy = Arc::new(Mutex::new(None::<tokio::time::Instant>));
    loop {
        if *stop.borrow() {
            return;
        }
        // Paced: after the fleet had no room, wait before claiming more.
        let pause = *busy.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(until) = pause {
            tokio::select! {
                _ = stopped(&mut stop) => return,
                _ = tokio::time::sleep_until(until) => {}
            }
            *busy.lock().unwrap_or_else(PoisonError::into_inner) = None;
        }
        let free = slots.available_permits();
        if free == 0 {
            let Ok(p) = slots.clone().acquire_owned().await else { return };
            drop(p);
            continue;
        }
        let leases = match jobs.store.claim(&jobs.worker, free, jobs.cfg.lease_ms, now_ms()).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "claim failed");
                Vec::new()
            }
        };
        if leases.is_empty() {
            tokio::select! {
                _ = stopped(&mut stop) => return,
                _ = jobs.wake.notified() => {}
                _ = tokio::time::sleep(poll) => {}
            }
            continue;
        }
        for lease in leases {
            jobs.counters.claimed.fetch_add(1, Ordering::Relaxed);
            let Ok(permit) = slots.clone().acquire_owned().await else { return };
            let (sh, jobs, busy) = (sh.clone(), jobs.clone(), busy.clone());
            tokio::spawn(async move {
                let _permit = permit;
                run_item(&sh, &jobs, lease, &busy).await;
            });
        }
    }
}

/// What the run of one item led to.
enum Ran {
    Done(Outcome),
    /// The fleet (or the router's admission) had no room: give the item back, pause claims.
    Busy,
    /// Told to abort (cancel, expiry).
    Aborted,
    /// Someone else owns the item now (the lease lapsed and was re-claimed): drop the result.
    Lost,
}

async fn run_item(
    sh: &Arc<Shared>,
    jobs: &Arc<Jobs>,
    lease: Lease,
    busy: &Mutex<Option<tokio::time::Instant>>,
) {
    let key = (lease.job_id.clone(), lease.item);
    let (tx, mut abort_rx) = oneshot::channel();
    jobs.running.lock().unwrap_or_else(PoisonError::into_inner).insert(key.clone(), tx);
    let ran = {
        let request = request_item(sh, jobs, &lease);
        tokio::pin!(request);
        let renew_every = Duration::from_millis(jobs.cfg.lease_ms / 3);
        let mut current = lease.clone();
        loop {
            tokio::select! {
                r = &mut request => break r,
                _ = &mut abort_rx => break Ran::Aborted,
                _ = tokio::time::sleep(renew_every) => {
                    match jobs.store.renew(&current, jobs.cfg.lease_ms, now_ms()).await {
                        Ok(l) => current = l,
                        Err(StoreError::Cancelling { .. }) => break Ran::Aborted,
                        Err(StoreError::StaleLease { .. }) => break Ran::Lost,
                        Err(e) => tracing::warn!(error = %e, "lease renewal failed; retrying"),
                    }
                }
            }
        }
    };
    jobs.running.lock().unwrap_or_else(PoisonError::into_inner).remove(&key);
    let outcome = match ran {
        Ran::Done(o) => o,
        Ran::Busy => {
            *busy.lock().unwrap_or_else(PoisonError::into_inner) =
                Some(tokio::time::Instant::now() + Duration::from_millis(jobs.cfg.busy_backoff_ms));
            jobs.counters.requeued.fetch_add(1, Ordering::Relaxed);
            Outcome::Aborted
        }
        Ran::Aborted => {
            jobs.counters.aborted.fetch_add(1, Ordering::Relaxed);
            Outcome::Aborted
        }
        Ran::Lost => {
            jobs.counters.stale.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    match &outcome {
        Outcome::Succeeded { .. } => jobs.counters.succeeded.fetch_add(1, Ordering::Relaxed),
        Outcome::Failed(_) => jobs.counters.failed.fetch_add(1, Ordering::Relaxed),
        Outcome::Aborted => 0,
    };
    // The store may be briefly unreachable: a few tries, then the lease lapses and the item
    // is claimed again (at most once more: the fencing token settles it).
    for attempt in 0..5u32 {
        match jobs.store.complete(&lease, outcome.clone(), now_ms()).await {
            Ok(c) => {
                if c.ready_to_finalize
                    && let Err(e) = jobs.finalize(&lease.job_id).await
                {
                    tracing::warn!(job = %lease.job_id, error = %e, "finalize failed; the tick retries");
                }
                if matches!(outcome, Outcome::Aborted) {
                    jobs.wake.notify_one();
                }
                return;
            }
            Err(e) if e.is_retryable() => {
                tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
            }
            Err(e) => {
                if !matches!(e, StoreError::StaleLease { .. }) {
                    tracing::warn!(job = %lease.job_id, item = lease.item, error = %e, "complete refused");
                }
                jobs.counters.stale.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
    }
}

/// Runs one item through the front, as the tenant.
async fn request_item(sh: &Arc<Shared>, jobs: &Jobs, lease: &Lease) -> Ran {
    let job = match jobs.store.job(&lease.job_id).await {
        Ok(Some(j)) => j,
        Ok(None) => return Ran::Lost,
        Err(_) => return Ran::Busy,
    };
    let meta = JobMeta::parse(&job);
    let failed = |code: &str, message: String| {
        Ran::Done(Outcome::Failed(ItemError { code: code.into(), message }))
    };
    let mut body: serde_json::Value = match serde_json::from_str(&lease.body) {
        Ok(b) => b,
        Err(e) => return failed("invalid_request", e.to_string()),
    };
    if body.get("stream").and_then(serde_json::Value::as_bool) == Some(true) {
        return failed(
            "invalid_request",
            "`stream: true` cannot be batched: the answer is stored whole".into(),
        );
    }
    // Run as a stream (folded back into one completion) unless the answer has parts a fold
    // would lose (tool calls, several choices, log probabilities).
    let streamed = body.get("tools").is_none()
        && body.get("functions").is_none()
        && body.get("n").and_then(serde_json::Value::as_u64).unwrap_or(1) == 1
        && body.get("logprobs").and_then(serde_json::Value::as_bool) != Some(true);
    if let Some(o) = body.as_object_mut() {
        o.remove("stream");
        if streamed {
            o.insert("stream".into(), true.into());
            o.insert("stream_options".into(), serde_json::json!({"include_usage": true}));
        }
    }
    let bearer = match jobs.bearer(&job.tenant, &meta) {
        Ok(b) => b,
        Err(e) => return Ran::Done(Outcome::Failed(e)),
    };
    let tenant: Arc<str> = Arc::from(job.tenant.as_str());
    let caller = bearer.map(|b| edgeroute_proxy::Caller { tenant: job.tenant.clone(), bearer: b });
    let body = body.to_string();
    let limit = jobs.store.limits().max_result_bytes;
    let lanes = u64::try_from(jobs.cfg.workers).unwrap_or(1).max(1);
    let (status, bytes) = loop {
        // Interactive traffic first: an item waits for a batch-class place as long as it
        // takes (its lease is renewed meanwhile), without spending an attempt.
        let permit = loop {
            match sh.gate.enter(tenant.clone(), Class::Batch).await {
                Ok((p, _)) => break p,
                Err(Refusal::QueueFull | Refusal::Timeout) => {
                    tokio::time::sleep(Duration::from_millis(jobs.cfg.busy_backoff_ms)).await;
                }
            }
        };
        // Items are independent conversations: a job's items spread over as many sessions as
        // this replica runs items at once (`job-<id>-<lane>`), so the fleet's nodes share a
        // batch rather than one pinned node taking it all — and a large batch does not churn
        // the session table interactive callers live in.
        let req = Request::builder()
            .method(http::Method::POST)
            .uri(&lease.endpoint)
            .header(header::CONTENT_TYPE, "application/json")
            .header(PRIORITY_HEADER, "batch")
            .header(
                edgeroute_proto::headers::SESSION_HEADER,
                format!("job-{}-{}", lease.job_id, lease.item % lanes),
            )
            .body(Body::from(body.clone()));
        let Ok(req) = req else { return failed("invalid_request", "unusable request".into()) };
        let res = edgeroute_proxy::chat_for(&sh.front, caller.as_ref(), req).await;
        let status = res.status();
        let wait = res
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|s| Duration::from_secs(s.min(60)));
        let bytes = match http_body_util::Limited::new(res.into_body(), limit).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                return failed("response_too_large", format!("answer over {limit} bytes: {e}"));
            }
        };
        drop(permit);
        // Every node is full (or the tenant is over a rate): buffering, not shedding — the
        // item waits for room and tries again, spending no attempt; its lease is renewed, and
        // a cancel or the job's expiry still aborts it.
        if saturated(status, &bytes) {
            jobs.counters.saturated.fetch_add(1, Ordering::Relaxed);
            let pause = Duration::from_millis(jobs.cfg.busy_backoff_ms);
            tokio::time::sleep(wait.map_or(pause, |w| w.min(pause))).await;
            continue;
        }
        break (status, bytes);
    };
    let retryable = status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error();
    if streamed && status.is_success() {
        return match fold_stream(&bytes) {
            Some(v) => Ran::Done(Outcome::Succeeded { status_code: status.as_u16(), body: v }),
            // Cut past every continuation the SDK could make: the item runs again if it may.
            None if lease.attempt < jobs.store.limits().max_attempts => Ran::Busy,
            None => {
                failed("stream_incomplete", "the answer was cut and could not be continued".into())
            }
        };
    }
    let value: serde_json::Value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| serde_json::Value::from(String::from_utf8_lossy(&bytes).into_owned()));
    if status.is_success() {
        return Ran::Done(Outcome::Succeeded { status_code: status.as_u16(), body: value });
    }
    // The SDK's ladder already tried every eligible node: the fleet is full or down for this
    // model now. Give the item back unless its attempts are spent.
    if retryable && lease.attempt < jobs.store.limits().max_attempts {
        return Ran::Busy;
    }
    let code = value["error"]["code"].as_str().unwrap_or(if retryable {
        "upstream_unavailable"
    } else {
        "invalid_request"
    });
    let message =
        value["error"]["message"].as_str().map_or_else(|| format!("HTTP {status}"), str::to_owned);
    failed(code, format!("HTTP {}: {message}", status.as_u16()))
}

/// Whether an answer says the fleet had no room now rather than that the item failed: the
/// SDK's `fleet_saturated` (every eligible node at its capacity) or a 429 (a rate limit).
fn saturated(status: StatusCode, body: &[u8]) -> bool {
    if status == StatusCode::TOO_MANY_REQUESTS {
        return true;
    }
    status == StatusCode::SERVICE_UNAVAILABLE
        && serde_json::from_slice::<serde_json::Value>(body)
            .is_ok_and(|v| v["error"]["code"] == "fleet_saturated")
}

/// A streamed chat completion's SSE body folded into the `chat.completion` it stands for: what
/// a job item stores. Items run as streams so the SDK's mid-stream continuation applies (a
/// node lost mid-answer costs the rest of the answer on the next node, not the whole answer
/// again). `None` when the body is not a chat completion stream.
pub fn fold_stream(sse: &[u8]) -> Option<serde_json::Value> {
    use serde_json::{Value, json};
    let text = std::str::from_utf8(sse).ok()?;
    let (mut id, mut model, mut created, mut fingerprint) =
        (Value::Null, Value::Null, Value::Null, Value::Null);
    let mut usage = Value::Null;
    // By choice index: (role, content, finish_reason).
    let mut choices: std::collections::BTreeMap<u64, (String, String, Value)> =
        std::collections::BTreeMap::new();
    let mut done = false;
    for line in text.lines() {
        let Some(data) = line.strip_prefix("data:") else { continue };
        let data = data.trim();
        if data == "[DONE]" {
            done = true;
            break;
        }
        let chunk: Value = serde_json::from_str(data).ok()?;
        if chunk.get("error").is_some() {
            return None;
        }
        if id.is_null() {
            id = chunk["id"].clone();
            model = chunk["model"].clone();
            created = chunk["created"].clone();
            fingerprint = chunk["system_fingerprint"].clone();
        }
        if !chunk["usage"].is_null() {
            usage = chunk["usage"].clone();
        }
        for c in chunk["choices"].as_array().into_iter().flatten() {
            let entry = choices
                .entry(c["index"].as_u64().unwrap_or(0))
                .or_insert_with(|| ("assistant".to_owned(), String::new(), Value::Null));
            if let Some(r) = c["delta"]["role"].as_str() {
                entry.0 = r.to_owned();
            }
            if let Some(t) = c["delta"]["content"].as_str() {
                entry.1.push_str(t);
            }
            if !c["finish_reason"].is_null() {
                entry.2 = c["finish_reason"].clone();
            }
        }
    }
    if !done || id.is_null() {
        return None;
    }
    let choices: Vec<Value> = choices
        .into_iter()
        .map(|(index, (role, content, finish))| {
            json!({
                "index": index,
                "message": {"role": role, "content": content},
                "finish_reason": finish,
                "logprobs": null,
            })
        })
        .collect();
    let mut out = json!({
        "id": id, "object": "chat.completion", "created": created, "model": model,
        "choices": choices, "usage": usage,
    });
    if !fingerprint.is_null() {
        out["system_fingerprint"] = fingerprint;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_folds_into_the_completion_it_stands_for() {
        let sse = concat!(
            "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":7,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n",
            "data: {\"id\":\"c1\",\"created\":7,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello\"},\"finish_reason\":null}]}\n\n",
            ": keep-alive\n\n",
            "data: {\"id\":\"c1\",\"created\":7,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" world\"},\"finish_reason\":\"length\"}]}\n\n",
            "data: {\"id\":\"c1\",\"created\":7,\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2,\"total_tokens\":5}}\n\n",
            "data: [DONE]\n\n",
        );
        let v = fold_stream(sse.as_bytes()).unwrap();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["choices"][0]["message"]["content"], "Hello world");
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert_eq!(v["usage"]["total_tokens"], 5);
        // Cut before [DONE], or an error event: not an answer.
        let cut = sse.replace("data: [DONE]\n\n", "");
        assert!(fold_stream(cut.as_bytes()).is_none());
        let first = sse.lines().next().unwrap();
        let err =
            format!("{first}\n\ndata: {{\"error\":{{\"message\":\"x\"}}}}\n\ndata: [DONE]\n\n");
        assert!(fold_stream(err.as_bytes()).is_none());
    }
}
