//! One conformance suite, run against both stores: SQLite (a file in a temporary directory)
//! and PostgreSQL (a schema of its own per test, dropped at the end).
//!
//! PostgreSQL comes from `EDGEROUTE_TEST_POSTGRES` (a URL; `scripts/test.sh` sets it, starting
//! a private server when none answers on 127.0.0.1:5432). Without it the PostgreSQL tests
//! fail, naming the variable, unless `EDGEROUTE_TEST_POSTGRES_SKIP=1` says to skip them.
#![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use edgeroute_jobs::batch::{Batch, CompleteError};
use edgeroute_jobs::lifecycle::Settle;
use edgeroute_jobs::store::postgres::{PostgresConfig, PostgresStore};
use edgeroute_jobs::store::sqlite::{SqliteConfig, SqliteStore};
use edgeroute_jobs::{
    BatchStatus, ItemEnd, ItemError, JobKind, JobStore, Lease, Limits, NewFile, NewItem, NewJob,
    Outcome, StoreError,
};
use rand::{Rng, SeedableRng};

// ---------------------------------------------------------------------------------------------
// Fixtures

trait Fixture: Send + Sync + 'static {
    type Store: JobStore + Clone;
    /// Opens a store on this fixture's storage (again: the same data).
    fn open(&self, limits: Limits) -> impl Future<Output = Self::Store> + Send;
    fn cleanup(&self) -> impl Future<Output = ()> + Send;
    /// How much of the differential test to run (PostgreSQL round trips are slower).
    fn seeds(&self) -> u64;
}

struct Sqlite {
    dir: tempfile::TempDir,
}

impl Sqlite {
    async fn new() -> Option<Self> {
        Some(Sqlite { dir: tempfile::tempdir().unwrap() })
    }
}

impl Fixture for Sqlite {
    type Store = SqliteStore;
    async fn open(&self, limits: Limits) -> SqliteStore {
        let config = SqliteConfig { limits, ..SqliteConfig::new(self.dir.path().join("jobs.db")) };
        SqliteStore::open(config).await.unwrap()
    }
    async fn cleanup(&self) {}
    fn seeds(&self) -> u64 {
        40
    }
}

struct Postgres {
    url: String,
    schema: String,
}

static SCHEMAS: AtomicU32 = AtomicU32::new(0);

#[allow(clippy::disallowed_methods)] // A test finding the database the test script started.
fn postgres_url() -> Option<String> {
    match std::env::var("EDGEROUTE_TEST_POSTGRES") {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var("EDGEROUTE_TEST_POSTGRES_SKIP").as_deref() == Ok("1") => {
            eprintln!("EDGEROUTE_TEST_POSTGRES_SKIP=1: PostgreSQL conformance tests skipped");
            None
        }
        _ => panic!(
            "EDGEROUTE_TEST_POSTGRES is not set: run scripts/test.sh (it starts a PostgreSQL), \
             or export EDGEROUTE_TEST_POSTGRES=postgres://postgres@127.0.0.1:5432/test, \
             or EDGEROUTE_TEST_POSTGRES_SKIP=1 to skip the PostgreSQL store's tests"
        ),
    }
}

impl Postgres {
    async fn new() -> Option<Self> {
        let url = postgres_url()?;
        let n = SCHEMAS.fetch_add(1, Ordering::Relaxed);
        let salt: u32 = rand::rngs::StdRng::from_os_rng().random();
        let schema = format!("edgeroute_jobs_t{}_{n}_{salt:08x}", std::process::id());
        Some(Postgres { url, schema })
    }
}

impl Fixture for Postgres {
    type Store = PostgresStore;
    async fn open(&self, limits: Limits) -> PostgresStore {
        let config = PostgresConfig { limits, ..PostgresConfig::new(&self.url, &self.schema) };
        match PostgresStore::connect(config).await {
            Ok(s) => s,
            Err(e) => panic!("PostgreSQL at EDGEROUTE_TEST_POSTGRES={}: {e}", self.url),
        }
    }
    async fn cleanup(&self) {
        // Not a panic: a failed test's own panic is the one worth reading.
        let store = self.open(Limits::default()).await;
        if let Err(e) = store.drop_schema().await {
            eprintln!("could not drop test schema {}: {e}", self.schema);
        }
    }
    fn seeds(&self) -> u64 {
        12
    }
}

/// Runs one test on each store; the fixture is cleaned up even when the test panics.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let fx = super::Sqlite::new().await.unwrap();
                    super::run(fx, |fx| async move { super::$name(&*fx).await }).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(fx) = super::Postgres::new().await else { return };
                    super::run(fx, |fx| async move { super::$name(&*fx).await }).await;
                }
            )*
        }
    };
}

async fn run<F, T, Fut>(fx: F, test: T)
where
    F: Fixture,
    T: FnOnce(Arc<F>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let fx = Arc::new(fx);
    let result = tokio::spawn(test(Arc::clone(&fx))).await;
    fx.cleanup().await;
    if let Err(e) = result {
        std::panic::resume_unwind(e.into_panic());
    }
}

conformance!(
    files_round_trip_and_the_size_limit_holds,
    a_batch_runs_to_completed_with_every_item_in_one_file_keyed_by_custom_id,
    two_workers_claiming_concurrently_never_get_the_same_item,
    an_expired_lease_is_reclaimed_with_a_higher_fence_and_the_old_holder_is_refused,
    reopening_after_a_crash_loses_nothing,
    cancel_while_items_are_leased_aborts_them_and_ends_cancelled,
    a_cancel_racing_claims_and_completions_leaves_no_lease_unaborted,
    idempotency_keys_return_the_same_job,
    spent_attempts_fail_an_item_and_expiry_ends_the_rest,
    limits_and_illegal_calls_are_refused_with_typed_errors,
    the_store_follows_the_reference_machine,
    webhooks_wait_in_the_outbox_until_delivered_once_per_id,
    a_tenant_lists_its_own_jobs_newest_first_page_by_page,
);

// ---------------------------------------------------------------------------------------------
// Helpers

const EP: &str = "/v1/chat/completions";
const HOUR: u64 = 3_600_000;

fn job(tenant: &str, n: usize, key: Option<&str>) -> NewJob {
    NewJob {
        tenant: tenant.into(),
        kind: JobKind::Batch,
        endpoint: EP.into(),
        completion_window_ms: 24 * HOUR,
        input_file_id: None,
        idempotency_key: key.map(Into::into),
        metadata: None,
        items: (0..n)
            .map(|i| NewItem { custom_id: format!("req-{i}"), body: format!("{{\"n\":{i}}}") })
            .collect(),
    }
}

fn ok(n: u64) -> Outcome {
    Outcome::Succeeded { status_code: 200, body: serde_json::json!({ "answer": n }) }
}

fn failed() -> Outcome {
    Outcome::Failed(ItemError { code: "upstream_error".into(), message: "502 from node".into() })
}

/// A result file's lines by custom_id: (has a response, the error code if any).
async fn lines(
    store: &impl JobStore,
    id: Option<&str>,
) -> BTreeMap<String, (bool, Option<String>)> {
    let Some(id) = id else { return BTreeMap::new() };
    let (_, bytes) = store.file(id).await.unwrap().unwrap();
    let text = String::from_utf8(bytes).unwrap();
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let key = v["custom_id"].as_str().unwrap().to_owned();
        let code = v["error"]["code"].as_str().map(str::to_owned);
        let prev = out.insert(key.clone(), (!v["response"].is_null(), code));
        assert!(prev.is_none(), "{key} twice in one file");
    }
    out
}

fn stale(e: &StoreError) -> bool {
    matches!(e, StoreError::StaleLease { .. })
}

// ---------------------------------------------------------------------------------------------
// The suite

async fn files_round_trip_and_the_size_limit_holds(fx: &impl Fixture) {
    let store = fx.open(Limits { max_file_bytes: 16, ..Limits::default() }).await;
    let file = NewFile {
        tenant: "acme".into(),
        purpose: "batch".into(),
        filename: "in.jsonl".into(),
        bytes: b"0123456789abcdef".to_vec(),
    };
    let meta = store.put_file(file.clone(), 7).await.unwrap();
    assert!(meta.id.starts_with("file_"));
    assert_eq!((meta.bytes, meta.created_at), (16, 7));
    let (got, bytes) = store.file(&meta.id).await.unwrap().unwrap();
    assert_eq!((got, bytes), (meta, file.bytes.clone()));
    let big = NewFile { bytes: vec![b'x'; 17], ..file };
    assert!(matches!(
        store.put_file(big, 8).await,
        Err(StoreError::FileTooLarge { bytes: 17, max: 16 })
    ));
    assert!(store.file("file_missing").await.unwrap().is_none());
}

async fn a_batch_runs_to_completed_with_every_item_in_one_file_keyed_by_custom_id(
    fx: &impl Fixture,
) {
    let store = fx.open(Limits::default()).await;
    let created = store.create_job(job("acme", 3, None), 1_000).await.unwrap();
    assert!(!created.existing);
    let id = created.job.id.clone();
    assert_eq!(created.job.status, BatchStatus::InProgress);
    assert_eq!(created.job.counts.total, 3);
    let leases = store.claim("w1", 10, 60_000, 1_000).await.unwrap();
    assert_eq!(leases.iter().map(|l| l.item).collect::<Vec<_>>(), [0, 1, 2]);
    assert!(leases.iter().all(|l| l.attempt == 1 && l.endpoint == EP && l.job_id == id));
    assert_eq!(leases[1].custom_id, "req-1");
    assert_eq!(leases[1].body, r#"{"n":1}"#);
    assert!(store.claim("w2", 10, 60_000, 1_000).await.unwrap().is_empty());
    store.complete(&leases[0], ok(0), 1_100).await.unwrap();
    store.complete(&leases[1], failed(), 1_200).await.unwrap();
    let last = store.complete(&leases[2], ok(2), 1_300).await.unwrap();
    assert_eq!(last.status, BatchStatus::Finalizing);
    assert!(last.ready_to_finalize);
    // A second completion of an ended item is refused: it ended once.
    assert!(stale(&store.complete(&leases[2], ok(2), 1_301).await.unwrap_err()));
    assert_eq!(store.tick(1_400).await.unwrap().ready, vec![id.clone()]);
    let done = store.finalize(&id, 1_500).await.unwrap();
    assert_eq!(done.status, BatchStatus::Completed);
    assert_eq!((done.counts.completed, done.counts.failed), (2, 1));
    assert_eq!(done.finished_at, Some(1_500));
    let output = lines(&store, done.output_file_id.as_deref()).await;
    let error = lines(&store, done.error_file_id.as_deref()).await;
    assert_eq!(output.keys().collect::<Vec<_>>(), ["req-0", "req-2"]);
    assert_eq!(error.get("req-1"), Some(&(false, Some("upstream_error".into()))));
    // Finalizing again changes nothing.
    assert_eq!(store.finalize(&id, 9_999).await.unwrap(), done);
    assert!(store.tick(2_000).await.unwrap().ready.is_empty());
}

async fn two_workers_claiming_concurrently_never_get_the_same_item(fx: &impl Fixture) {
    const N: usize = 300;
    let a = fx.open(Limits::default()).await;
    // A second store on the same storage: another router replica.
    let b = fx.open(Limits::default()).await;
    let j1 = a.create_job(job("acme", N / 2, None), 0).await.unwrap().job.id;
    let j2 = b.create_job(job("other", N / 2, None), 1).await.unwrap().job.id;
    let mut workers = Vec::new();
    for (w, store) in [a.clone(), b.clone(), a.clone(), b.clone()].into_iter().enumerate() {
        workers.push(tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                let leases = store.claim(&format!("w{w}"), 7, 60_000, 10).await.unwrap();
                if leases.is_empty() {
                    return got;
                }
                for l in leases {
                    store.complete(&l, ok(l.item), 20).await.unwrap();
                    got.push((l.job_id, l.item));
                }
            }
        }));
    }
    let mut all = Vec::new();
    let mut busy = 0;
    for w in workers {
        let got = w.await.unwrap();
        busy += usize::from(!got.is_empty());
        all.extend(got);
    }
    let unique: BTreeSet<_> = all.iter().cloned().collect();
    assert_eq!(unique.len(), all.len(), "an item was claimed twice");
    assert_eq!(all.len(), N, "every item claimed once");
    assert!(busy >= 2, "the workers ran concurrently");
    for id in [j1, j2] {
        let job = a.job(&id).await.unwrap().unwrap();
        assert_eq!(job.status, BatchStatus::Finalizing);
        assert_eq!(job.counts.completed, (N / 2) as u64);
    }
}

async fn an_expired_lease_is_reclaimed_with_a_higher_fence_and_the_old_holder_is_refused(
    fx: &impl Fixture,
) {
    let store = fx.open(Limits::default()).await;
    let id = store.create_job(job("acme", 1, None), 0).await.unwrap().job.id;
    let old = store.claim("paused", 1, 100, 0).await.unwrap().remove(0);
    assert!(store.claim("other", 1, 100, 99).await.unwrap().is_empty(), "the lease holds");
    let renewed = store.renew(&old, 100, 50).await.unwrap();
    assert_eq!(renewed.expires_at, 150);
    assert!(store.claim("other", 1, 100, 149).await.unwrap().is_empty(), "renewed");
    let new = store.claim("other", 1, 100, 150).await.unwrap().remove(0);
    assert_eq!((new.item, new.attempt), (old.item, 2));
    assert!(new.fence > old.fence, "{} > {}", new.fence, old.fence);
    // The paused worker wakes up and tries to finish: refused, and nothing changes.
    assert!(stale(&store.complete(&old, ok(1), 160).await.unwrap_err()));
    assert!(stale(&store.renew(&old, 100, 160).await.unwrap_err()));
    assert!(stale(&store.complete(&old, Outcome::Aborted, 160).await.unwrap_err()));
    let job = store.job(&id).await.unwrap().unwrap();
    assert_eq!((job.counts.completed, job.counts.failed), (0, 0));
    assert_eq!(store.complete(&new, ok(2), 170).await.unwrap().status, BatchStatus::Finalizing);
    let done = store.finalize(&id, 180).await.unwrap();
    assert_eq!(lines(&store, done.output_file_id.as_deref()).await.len(), 1);
    assert!(done.error_file_id.is_none());
}

async fn reopening_after_a_crash_loses_nothing(fx: &impl Fixture) {
    let (id, leased, file_id) = {
        let store = fx.open(Limits::default()).await;
        let file = NewFile {
            tenant: "acme".into(),
            purpose: "batch".into(),
            filename: "in.jsonl".into(),
            bytes: b"{}".to_vec(),
        };
        let file_id = store.put_file(file, 0).await.unwrap().id;
        let id = store.create_job(job("acme", 4, Some("k1")), 0).await.unwrap().job.id;
        let leases = store.claim("w1", 2, 1_000, 10).await.unwrap();
        store.complete(&leases[0], ok(0), 20).await.unwrap();
        // The process dies here: the store is dropped holding a lease, nothing is closed.
        (id, leases[1].clone(), file_id)
    };
    let store = fx.open(Limits::default()).await;
    assert!(store.file(&file_id).await.unwrap().is_some());
    let job = store.job(&id).await.unwrap().unwrap();
    assert_eq!(job.status, BatchStatus::InProgress);
    assert_eq!((job.counts.total, job.counts.completed, job.counts.failed), (4, 1, 0));
    // The idempotency key still names the job.
    let again = store.create_job(job_with_key(4, "k1"), 30).await.unwrap();
    assert!(again.existing);
    assert_eq!(again.job.id, id);
    // The queued items are claimable now, the leased one once its lease lapses.
    let now_free = store.claim("w2", 10, 1_000, 40).await.unwrap();
    assert_eq!(now_free.iter().map(|l| l.item).collect::<Vec<_>>(), [2, 3]);
    let reclaimed = store.claim("w2", 10, 1_000, 1_010).await.unwrap();
    assert_eq!(reclaimed.len(), 1);
    assert_eq!(reclaimed[0].item, leased.item);
    assert!(reclaimed[0].fence > leased.fence);
    for l in now_free.iter().chain(&reclaimed) {
        store.complete(l, ok(l.item), 1_020).await.unwrap();
    }
    let done = store.finalize(&id, 1_030).await.unwrap();
    assert_eq!(done.counts.completed, 4);
    assert_eq!(lines(&store, done.output_file_id.as_deref()).await.len(), 4);
}

fn job_with_key(n: usize, key: &str) -> NewJob {
    job("acme", n, Some(key))
}

async fn cancel_while_items_are_leased_aborts_them_and_ends_cancelled(fx: &impl Fixture) {
    let store = fx.open(Limits::default()).await;
    let id = store.create_job(job("acme", 5, None), 0).await.unwrap().job.id;
    let leases = store.claim("w1", 3, 10_000, 0).await.unwrap();
    store.complete(&leases[0], ok(0), 5).await.unwrap();
    let report = store.cancel(&id, 10).await.unwrap();
    assert_eq!(report.job.status, BatchStatus::Cancelling);
    assert_eq!(report.job.cancelling_at, Some(10));
    // The two queued items ended cancelled in the same transaction.
    assert_eq!((report.job.counts.completed, report.job.counts.failed), (1, 2));
    let aborts: Vec<(u64, u64)> = report.aborts.iter().map(|a| (a.item, a.fence)).collect();
    assert_eq!(aborts, [(1, leases[1].fence), (2, leases[2].fence)]);
    assert!(report.aborts.iter().all(|a| a.worker == "w1"));
    assert!(!report.ready_to_finalize);
    // Cancelling again returns the in-flight items again (an abort message may be lost).
    assert_eq!(store.cancel(&id, 11).await.unwrap().aborts, report.aborts);
    assert!(store.claim("w2", 10, 10_000, 20).await.unwrap().is_empty(), "nothing new starts");
    assert!(matches!(
        store.renew(&leases[1], 10_000, 20).await,
        Err(StoreError::Cancelling { item: 1, .. })
    ));
    // One worker aborts; the other had already finished and its answer is kept.
    let aborted = store.complete(&leases[1], Outcome::Aborted, 30).await.unwrap();
    assert_eq!(aborted.settle, Settle::End(ItemEnd::Cancelled));
    assert!(!aborted.ready_to_finalize);
    let last = store.complete(&leases[2], ok(2), 31).await.unwrap();
    assert!(last.ready_to_finalize);
    assert_eq!(last.status, BatchStatus::Cancelling);
    assert_eq!(store.tick(40).await.unwrap().ready, vec![id.clone()]);
    let done = store.finalize(&id, 50).await.unwrap();
    assert_eq!(done.status, BatchStatus::Cancelled);
    assert_eq!((done.counts.completed, done.counts.failed, done.counts.total), (2, 3, 5));
    let output = lines(&store, done.output_file_id.as_deref()).await;
    let error = lines(&store, done.error_file_id.as_deref()).await;
    assert_eq!(output.keys().collect::<Vec<_>>(), ["req-0", "req-2"]);
    assert_eq!(error.keys().collect::<Vec<_>>(), ["req-1", "req-3", "req-4"]);
    assert!(error.values().all(|(_, code)| code.as_deref() == Some("batch_cancelled")));
    assert!(matches!(store.cancel(&id, 60).await, Err(StoreError::Illegal(_))));
}

async fn a_cancel_racing_claims_and_completions_leaves_no_lease_unaborted(fx: &impl Fixture) {
    use std::sync::atomic::{AtomicBool, AtomicUsize};
    const N: usize = 500;
    let store = fx.open(Limits::default()).await;
    let id = store.create_job(job("acme", N, None), 0).await.unwrap().job.id;
    let claimed = Arc::new(AtomicUsize::new(0));
    let cancelled = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..4 {
        // Each worker on its own store: replicas racing through the database.
        let store = fx.open(Limits::default()).await;
        let (claimed, cancelled) = (Arc::clone(&claimed), Arc::clone(&cancelled));
        workers.push(tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                let after_cancel = cancelled.load(Ordering::SeqCst);
                let leases = store.claim(&format!("w{w}"), 2, 60_000, 10).await.unwrap();
                if leases.is_empty() && after_cancel {
                    return held;
                }
                claimed.fetch_add(leases.len(), Ordering::SeqCst);
                for (k, lease) in leases.into_iter().enumerate() {
                    // Half are answered at once (before or after the cancel); half stay in
                    // flight.
                    if k % 2 == 0 {
                        store.complete(&lease, ok(lease.item), 20).await.unwrap();
                    } else {
                        held.push(lease);
                    }
                }
                // Room for the cancel to land between claims (SQLite's writers take turns).
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        }));
    }
    while claimed.load(Ordering::SeqCst) < 40 {
        tokio::task::yield_now().await;
    }
    let first = store.cancel(&id, 30).await.unwrap();
    cancelled.store(true, Ordering::SeqCst);
    let mut held = Vec::new();
    for w in workers {
        held.extend(w.await.unwrap());
    }
    // Every lease still in flight is one the store asks to abort — with its current token.
    let again = store.cancel(&id, 40).await.unwrap();
    let in_flight: BTreeSet<(u64, u64)> = held.iter().map(|l| (l.item, l.fence)).collect();
    let aborts: BTreeSet<(u64, u64)> = again.aborts.iter().map(|a| (a.item, a.fence)).collect();
    assert_eq!(aborts, in_flight);
    // Nothing was claimed after the cancel was persisted: the items in flight now are among
    // those the cancel named (some of which were answered since).
    let named: BTreeSet<(u64, u64)> = first.aborts.iter().map(|a| (a.item, a.fence)).collect();
    assert!(aborts.is_subset(&named), "leased after the cancel: {:?}", aborts.difference(&named));
    for lease in &held {
        store.complete(lease, Outcome::Aborted, 50).await.unwrap();
    }
    let done = store.finalize(&id, 60).await.unwrap();
    assert_eq!(done.status, BatchStatus::Cancelled);
    assert_eq!(done.counts.completed + done.counts.failed, N as u64);
    let output = lines(&store, done.output_file_id.as_deref()).await;
    let error = lines(&store, done.error_file_id.as_deref()).await;
    assert_eq!(output.len() + error.len(), N);
    assert!(output.keys().all(|k| !error.contains_key(k)), "an item in both files");
    assert_eq!(output.len() as u64, done.counts.completed);
}

async fn idempotency_keys_return_the_same_job(fx: &impl Fixture) {
    let store = fx.open(Limits::default()).await;
    let first = store.create_job(job("acme", 2, Some("key-1")), 0).await.unwrap();
    let again = store.create_job(job("acme", 2, Some("key-1")), 5).await.unwrap();
    assert!(again.existing);
    assert_eq!(again.job, first.job);
    // The same key with another request is a conflict, not a silent replay.
    match store.create_job(job("acme", 3, Some("key-1")), 6).await {
        Err(StoreError::IdempotencyConflict { key, job_id }) => {
            assert_eq!((key.as_str(), job_id), ("key-1", first.job.id.clone()));
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    // Keys are per tenant.
    let theirs = store.create_job(job("other", 2, Some("key-1")), 7).await.unwrap();
    assert!(!theirs.existing);
    assert_ne!(theirs.job.id, first.job.id);
    // Concurrent submits with one key (a client retrying through two replicas) make one job.
    let replica = fx.open(Limits::default()).await;
    let (x, y) = tokio::join!(
        store.create_job(job("acme", 2, Some("key-2")), 10),
        replica.create_job(job("acme", 2, Some("key-2")), 10),
    );
    let (x, y) = (x.unwrap(), y.unwrap());
    assert_eq!(x.job.id, y.job.id);
    assert!(x.existing != y.existing, "exactly one created it");
    let leases = store.claim("w", 100, 1_000, 20).await.unwrap();
    assert_eq!(leases.len(), 6, "2 + 2 + 2 items: no duplicate job was made");
}

async fn spent_attempts_fail_an_item_and_expiry_ends_the_rest(fx: &impl Fixture) {
    let store = fx.open(Limits { max_attempts: 2, ..Limits::default() }).await;
    let poison = store.create_job(job("acme", 1, None), 0).await.unwrap().job.id;
    let first = store.claim("w", 1, 100, 0).await.unwrap().remove(0);
    let second = store.claim("w", 1, 100, 100).await.unwrap().remove(0);
    assert_eq!(second.attempt, 2);
    assert!(first.fence < second.fence);
    assert!(store.claim("w", 1, 100, 200).await.unwrap().is_empty(), "attempts spent");
    let tick = store.tick(200).await.unwrap();
    assert_eq!(tick.lapsed, 1);
    assert_eq!(tick.ready, vec![poison.clone()]);
    let done = store.finalize(&poison, 210).await.unwrap();
    assert_eq!(done.status, BatchStatus::Completed);
    let error = lines(&store, done.error_file_id.as_deref()).await;
    assert_eq!(error["req-0"].1.as_deref(), Some("lease_attempts_exhausted"));

    let mut short = job("acme", 3, None);
    short.completion_window_ms = 1_000;
    let id = store.create_job(short, 1_000).await.unwrap().job.id;
    let leases = store.claim("w", 2, 5_000, 1_000).await.unwrap();
    store.complete(&leases[0], ok(0), 1_500).await.unwrap();
    assert!(store.tick(1_999).await.unwrap().expired.is_empty());
    let tick = store.tick(2_000).await.unwrap();
    assert_eq!(tick.expired, vec![id.clone()]);
    assert_eq!(tick.aborts.iter().map(|a| a.item).collect::<Vec<_>>(), [1]);
    let job = store.job(&id).await.unwrap().unwrap();
    assert_eq!(job.status, BatchStatus::Expired);
    assert_eq!((job.counts.completed, job.counts.failed), (1, 2));
    assert!(stale(&store.complete(&leases[1], ok(1), 2_001).await.unwrap_err()));
    let error = lines(&store, job.error_file_id.as_deref()).await;
    assert_eq!(error.keys().collect::<Vec<_>>(), ["req-1", "req-2"]);
    assert!(error.values().all(|(_, c)| c.as_deref() == Some("batch_expired")));
    assert_eq!(lines(&store, job.output_file_id.as_deref()).await.len(), 1);
    assert!(matches!(store.cancel(&id, 2_100).await, Err(StoreError::Illegal(_))));
}

async fn limits_and_illegal_calls_are_refused_with_typed_errors(fx: &impl Fixture) {
    let limits = Limits {
        max_items_per_job: 2,
        max_result_bytes: 64,
        max_lease_ms: 1_000,
        max_claim: 1,
        ..Limits::default()
    };
    let store = fx.open(limits).await;
    assert!(matches!(
        store.create_job(job("acme", 3, None), 0).await,
        Err(StoreError::ItemCount { count: 3, max: 2 })
    ));
    assert!(matches!(
        store.create_job(job("acme", 0, None), 0).await,
        Err(StoreError::ItemCount { count: 0, .. })
    ));
    let id = store.create_job(job("acme", 2, None), 0).await.unwrap().job.id;
    assert!(matches!(
        store.claim("w", 1, 1_001, 0).await,
        Err(StoreError::LeaseLength { ms: 1_001, max: 1_000 })
    ));
    assert!(matches!(store.claim("w", 1, 0, 0).await, Err(StoreError::LeaseLength { .. })));
    let leases = store.claim("w", 10, 1_000, 0).await.unwrap();
    assert_eq!(leases.len(), 1, "max_claim bounds a claim");
    let huge = Outcome::Succeeded { status_code: 200, body: serde_json::json!("x".repeat(100)) };
    assert!(matches!(
        store.complete(&leases[0], huge, 1).await,
        Err(StoreError::ResultTooLarge { max: 64, .. })
    ));
    // The refused result changed nothing: the lease still completes.
    store.complete(&leases[0], ok(0), 2).await.unwrap();
    assert!(matches!(store.finalize(&id, 3).await, Err(StoreError::Illegal(_))));
    assert!(matches!(store.cancel("batch_nope", 3).await, Err(StoreError::NotFound { .. })));
    let ghost = Lease { job_id: "batch_nope".into(), ..leases[0].clone() };
    assert!(matches!(store.complete(&ghost, ok(0), 4).await, Err(StoreError::NotFound { .. })));
}

/// Random interleavings applied to the store and to the in-memory machine
/// (`edgeroute_jobs::batch`, the property-tested specification): after every step the status
/// and counts agree, and at the end the files hold the same items with the same ends.
async fn the_store_follows_the_reference_machine(fx: &impl Fixture) {
    const LEASE: u64 = 100;
    let max_attempts = 2;
    for seed in 0..fx.seeds() {
        let store = fx.open(Limits { max_attempts, ..Limits::default() }).await;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n = rng.random_range(1..6usize);
        let window = if rng.random_bool(0.3) { rng.random_range(200..2_000) } else { 24 * HOUR };
        let start = 1_000 * (seed + 1);
        let mut new = job("acme", n, None);
        new.completion_window_ms = window;
        let id = store.create_job(new, start).await.unwrap().job.id;
        let mut model = Batch::new(n, start, window, max_attempts);
        let mut now = start;
        let mut held: Vec<Lease> = Vec::new();
        for step in 0..40 {
            let ctx = format!("seed {seed} step {step}");
            match rng.random_range(0..10u8) {
                0..=2 => {
                    // The store ends lapsed-and-spent leases in `tick`; the machine does it
                    // in `claim`: tick first so both start from the same state.
                    store.tick(now).await.unwrap();
                    model.tick(now);
                    let got = store.claim("w", 1, LEASE, now).await.unwrap();
                    let want = model.claim(now, "w", LEASE);
                    assert_eq!(
                        got.first().map(|l| (l.item as usize, l.fence)),
                        want.map(|c| (c.item, c.fence)),
                        "{ctx}: claim"
                    );
                    held.extend(got);
                }
                3..=5 if !held.is_empty() => {
                    let lease = held.remove(rng.random_range(0..held.len()));
                    let outcome = match rng.random_range(0..4u8) {
                        0 => failed(),
                        1 => Outcome::Aborted,
                        _ => ok(lease.item),
                    };
                    let got = store.complete(&lease, outcome.clone(), now).await;
                    let want = model.complete(lease.item as usize, lease.fence, &outcome);
                    match (&got, &want) {
                        (Ok(g), Ok(w)) => assert_eq!(g.settle, w.settle, "{ctx}"),
                        (Err(e), Err(CompleteError::StaleLease { .. })) => {
                            assert!(stale(e), "{ctx}: {e}")
                        }
                        _ => panic!("{ctx}: store {got:?}, machine {want:?}"),
                    }
                }
                6 => now += rng.random_range(1..2 * LEASE),
                7 => {
                    store.tick(now).await.unwrap();
                    model.tick(now);
                }
                8 if rng.random_bool(0.3) => {
                    let got = store.cancel(&id, now).await;
                    let want = model.cancel();
                    assert_eq!(got.is_ok(), want.is_ok(), "{ctx}: cancel");
                    if let (Ok(g), Ok(w)) = (got, want) {
                        let g: Vec<_> =
                            g.aborts.iter().map(|a| (a.item as usize, a.fence)).collect();
                        let w: Vec<_> = w.iter().map(|a| (a.item, a.fence)).collect();
                        assert_eq!(g, w, "{ctx}: aborts");
                    }
                }
                _ => {
                    let got = store.finalize(&id, now).await;
                    let terminal = model.status().is_terminal();
                    let want = model.finalize().map(|_| ());
                    assert_eq!(got.is_ok(), want.is_ok() || terminal, "{ctx}: finalize {got:?}");
                }
            }
            let job = store.job(&id).await.unwrap().unwrap();
            assert_eq!(job.status, model.status(), "{ctx}: status");
            assert_eq!(job.counts, model.counts(), "{ctx}: counts");
        }
        // Drain both the same way until terminal.
        for _ in 0..200 {
            if model.status().is_terminal() {
                break;
            }
            store.tick(now).await.unwrap();
            model.tick(now);
            if model.ready_to_finalize() {
                model.finalize().unwrap();
                store.finalize(&id, now).await.unwrap();
                continue;
            }
            match (
                store.claim("d", 1, LEASE, now).await.unwrap().pop(),
                model.claim(now, "d", LEASE),
            ) {
                (Some(l), Some(c)) => {
                    assert_eq!((l.item as usize, l.fence), (c.item, c.fence));
                    store.complete(&l, ok(l.item), now).await.unwrap();
                    model.complete(c.item, c.fence, &ok(l.item)).unwrap();
                }
                (None, None) => now += LEASE,
                other => panic!("seed {seed}: drain claims differ: {other:?}"),
            }
        }
        let job = store.job(&id).await.unwrap().unwrap();
        assert_eq!(job.status, model.status(), "seed {seed}: final status");
        assert!(job.status.is_terminal());
        let files = model.files().unwrap();
        let output = lines(&store, job.output_file_id.as_deref()).await;
        let error = lines(&store, job.error_file_id.as_deref()).await;
        let want_out: Vec<String> = files.output.iter().map(|i| format!("req-{i}")).collect();
        assert_eq!(output.keys().cloned().collect::<Vec<_>>(), want_out, "seed {seed}");
        let want_err: Vec<String> = files.error.iter().map(|(i, _)| format!("req-{i}")).collect();
        assert_eq!(error.keys().cloned().collect::<Vec<_>>(), want_err, "seed {seed}");
        for (i, end) in &files.error {
            let code = error[&format!("req-{i}")].1.clone();
            let want = match end {
                ItemEnd::Cancelled => Some("batch_cancelled"),
                ItemEnd::Expired => Some("batch_expired"),
                _ => code
                    .as_deref()
                    .filter(|c| *c == "upstream_error" || *c == "lease_attempts_exhausted"),
            };
            assert_eq!(code.as_deref(), want, "seed {seed} item {i}");
        }
    }
}

#[tokio::test]
async fn a_busy_sqlite_file_and_an_unreachable_postgres_are_retryable_a_stale_lease_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jobs.db");
    let store = SqliteStore::open(SqliteConfig::new(&path)).await.unwrap();
    store.create_job(job("acme", 1, None), 0).await.unwrap();
    // Another process holds the write lock; this store does not wait for it.
    let holder = rusqlite::Connection::open(&path).unwrap();
    holder.execute_batch("BEGIN IMMEDIATE").unwrap();
    let impatient =
        SqliteStore::open(SqliteConfig { busy_timeout_ms: 0, ..SqliteConfig::new(&path) }).await;
    let busy = match impatient {
        Ok(s) => s.claim("w", 1, 1_000, 0).await.unwrap_err(),
        Err(e) => e,
    };
    assert!(busy.is_retryable(), "{busy}");
    holder.execute_batch("ROLLBACK").unwrap();
    let lease = store.claim("w", 1, 1_000, 0).await.unwrap().remove(0);
    store.complete(&lease, ok(0), 1).await.unwrap();
    let stale = store.complete(&lease, ok(0), 2).await.unwrap_err();
    assert!(!stale.is_retryable(), "{stale}");

    let nowhere = PostgresStore::connect(PostgresConfig::new(
        "postgres://postgres@127.0.0.1:1/test?connect_timeout=2",
        "unreachable",
    ))
    .await;
    let e = nowhere.err().expect("nothing listens on port 1");
    assert!(e.is_retryable(), "{e}");
}

async fn webhooks_wait_in_the_outbox_until_delivered_once_per_id(fx: &impl Fixture) {
    use edgeroute_jobs::webhook::schedule::{Attempt, Next, RetryPolicy};
    use edgeroute_jobs::{NewWebhook, WebhookState};
    let store = fx.open(Limits { max_webhook_body_bytes: 64, ..Limits::default() }).await;
    let replica = fx.open(Limits::default()).await;
    let hook = |id: &str| NewWebhook {
        id: id.into(),
        job_id: "batch_1".into(),
        url: "https://hooks.example.com/h".into(),
        body: r#"{"type":"batch.completed"}"#.into(),
    };
    assert!(store.enqueue_webhook(hook("msg_1"), 0).await.unwrap());
    assert!(!replica.enqueue_webhook(hook("msg_1"), 1).await.unwrap(), "deduped by id");
    assert!(store.enqueue_webhook(hook("msg_2"), 0).await.unwrap());
    let big = NewWebhook { body: "x".repeat(65), ..hook("msg_3") };
    assert!(matches!(
        store.enqueue_webhook(big, 0).await,
        Err(StoreError::WebhookTooLarge { bytes: 65, max: 64 })
    ));
    // Two replicas take the due messages: each once.
    let (a, b) = tokio::join!(store.due_webhooks(1, 1_000, 10), replica.due_webhooks(1, 1_000, 10));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.len() + b.len(), 2);
    let mut ids: Vec<&str> = a.iter().chain(&b).map(|d| d.id.as_str()).collect();
    ids.sort();
    assert_eq!(ids, ["msg_1", "msg_2"]);
    assert!(store.due_webhooks(10, 1_000, 10).await.unwrap().is_empty(), "leased");
    let first = a.iter().chain(&b).find(|d| d.id == "msg_1").unwrap().clone();
    let other = a.iter().chain(&b).find(|d| d.id == "msg_2").unwrap().clone();
    assert_eq!((first.attempt, first.lease_until), (1, 1_010));
    // A failure: the pure policy decides when to try again; the outbox keeps it.
    let policy = RetryPolicy { jitter: 0.0, ..RetryPolicy::default() };
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let next = policy.next(first.attempt, Attempt::from_status(Some(503), None), 20, &mut rng);
    assert_eq!(next, Next::RetryAt(5_020));
    store.record_webhook(&first, next, 20).await.unwrap();
    assert_eq!(
        replica.webhook("msg_1").await.unwrap(),
        Some(WebhookState::Pending { attempts: 1, next_at: 5_020 })
    );
    assert!(matches!(
        store.record_webhook(&first, Next::Done, 21).await,
        Err(StoreError::StaleDelivery { attempt: 1, .. })
    ));
    // The worker holding msg_2 died: once its lease ends msg_2 is due again; msg_1 waits for
    // its retry time.
    assert!(store.due_webhooks(10, 1_000, 1_009).await.unwrap().is_empty());
    let retaken = store.due_webhooks(10, 1_000, 5_019).await.unwrap();
    let attempts: Vec<(&str, u32)> = retaken.iter().map(|d| (d.id.as_str(), d.attempt)).collect();
    assert_eq!(attempts, [("msg_2", 2)]);
    assert!(matches!(
        store.record_webhook(&other, Next::Done, 5_019).await,
        Err(StoreError::StaleDelivery { .. })
    ));
    let retried = store.due_webhooks(10, 1_000, 5_020).await.unwrap();
    let attempts: Vec<(&str, u32)> = retried.iter().map(|d| (d.id.as_str(), d.attempt)).collect();
    assert_eq!(attempts, [("msg_1", 2)]);
    for d in retaken.iter().chain(&retried) {
        store.record_webhook(d, Next::Done, 5_030).await.unwrap();
    }
    // Reopened, nothing is due and the states stand.
    let reopened = fx.open(Limits::default()).await;
    assert!(reopened.due_webhooks(10, 1_000, 99_999).await.unwrap().is_empty());
    assert_eq!(
        reopened.webhook("msg_2").await.unwrap(),
        Some(WebhookState::Delivered { attempts: 2 })
    );
    assert!(!reopened.enqueue_webhook(hook("msg_2"), 6_000).await.unwrap(), "still deduped");
    assert_eq!(reopened.webhook("msg_9").await.unwrap(), None);
}

async fn a_tenant_lists_its_own_jobs_newest_first_page_by_page(fx: &impl Fixture) {
    let store = fx.open(Limits::default()).await;
    let mut mine = Vec::new();
    // Two jobs share a millisecond: the id breaks the tie, so pages neither skip nor repeat.
    for (i, at) in [10, 20, 20, 30, 40].into_iter().enumerate() {
        mine.push((at, store.create_job(job("acme", 1, None), at).await.unwrap().job.id));
        let theirs = store.create_job(job("other", 1, None), at + i as u64).await.unwrap();
        assert_ne!(theirs.job.tenant, "acme");
    }
    let mut single = job("acme", 1, None);
    single.kind = JobKind::Single;
    store.create_job(single, 50).await.unwrap();
    mine.sort_by(|a, b| b.cmp(a));
    let expected: Vec<String> = mine.into_iter().map(|(_, id)| id).collect();
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = store.list_jobs("acme", JobKind::Batch, after.as_deref(), 2).await.unwrap();
        assert!(page.iter().all(|j| j.tenant == "acme" && j.kind == JobKind::Batch));
        if page.is_empty() {
            break;
        }
        after = page.last().map(|j| j.id.clone());
        seen.extend(page.into_iter().map(|j| j.id));
    }
    assert_eq!(seen, expected, "newest first, every job once");
    // Another tenant's id is not a cursor (nor a way to learn it exists).
    let theirs = store.list_jobs("other", JobKind::Batch, None, 1).await.unwrap();
    match store.list_jobs("acme", JobKind::Batch, Some(&theirs[0].id), 2).await {
        Err(StoreError::NotFound { what: "job", .. }) => {}
        other => panic!("expected not found, got {other:?}"),
    }
    assert_eq!(store.list_jobs("acme", JobKind::Single, None, 10).await.unwrap().len(), 1);
}
