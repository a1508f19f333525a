//! The job store: files, jobs (a batch, or a single async request as a job of one item),
//! items with leases and fencing tokens, idempotency keys. One trait, [`JobStore`], and two
//! implementations that pass one conformance suite (`tests/conformance.rs`):
//! [`sqlite::SqliteStore`] (embedded, one file) and [`postgres::PostgresStore`] (several
//! router replicas sharing a regional PostgreSQL).
//!
//! Every decision is [`crate::lifecycle`]'s; the stores make them atomic. Files (batch input,
//! output and error JSONL) live in the store itself, in the `files` table, up to
//! [`Limits::max_file_bytes`] each.
//!
//! How the router drives it: `create_job` (durable on return) → workers loop on `claim`
//! (`renew` while a request runs longer than its lease) → `complete` with the lease they got;
//! `cancel` persists `cancelling` and returns the in-flight items to abort (over NATS);
//! `tick(now)` runs every second or so on each replica (lapsed leases, expiry) and lists the
//! batches ready for `finalize`, which writes the files and takes the terminal status.
//! Webhooks go through an outbox: `enqueue_webhook` (deduped by `webhook-id`) → `due_webhooks`
//! (one attempt each, leased; a worker that dies mid-attempt leaves the message due again
//! when the lease ends) → `record_webhook` with what
//! [`RetryPolicy::next`](crate::webhook::schedule::RetryPolicy::next) decided (once per
//! attempt: a stale attempt is refused).
//! Every method takes `now` (Unix ms); the store never reads a clock.

use std::future::Future;

use sha2::{Digest, Sha256};

use crate::lifecycle::{BatchStatus, IllegalTransition, Outcome, RequestCounts, Settle, UnixMs};

pub mod postgres;
pub mod sqlite;

/// Every limit of the store; all explicit, all configurable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest file accepted by `put_file` (OpenAI's batch input limit: 200 MB).
    pub max_file_bytes: usize,
    /// Most items in one job (OpenAI: 50,000).
    pub max_items_per_job: usize,
    /// Longest input line.
    pub max_line_bytes: usize,
    /// Largest stored response or error of one item.
    pub max_result_bytes: usize,
    /// Claims of one item before a lapsed lease fails it (`lease_attempts_exhausted`).
    pub max_attempts: u32,
    /// Most items one `claim` call returns.
    pub max_claim: usize,
    /// Longest lease a worker may ask for (ms).
    pub max_lease_ms: u64,
    /// Largest webhook body kept in the outbox.
    pub max_webhook_body_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_file_bytes: 200 * 1024 * 1024,
            max_items_per_job: 50_000,
            max_line_bytes: 1024 * 1024,
            max_result_bytes: 4 * 1024 * 1024,
            max_attempts: 3,
            max_claim: 256,
            max_lease_ms: 15 * 60 * 1000,
            max_webhook_body_bytes: 1024 * 1024,
        }
    }
}

/// A file to store.
#[derive(Clone, Debug)]
pub struct NewFile {
    /// Its owner (the token's subject).
    pub tenant: String,
    /// OpenAI's purpose (`batch`, `batch_output`).
    pub purpose: String,
    /// The name the client gave.
    pub filename: String,
    /// Its content.
    pub bytes: Vec<u8>,
}

/// A stored file's description.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileMeta {
    /// `file_…`.
    pub id: String,
    /// Its owner.
    pub tenant: String,
    /// Its purpose.
    pub purpose: String,
    /// Its name.
    pub filename: String,
    /// Its size.
    pub bytes: u64,
    /// When it was stored.
    pub created_at: UnixMs,
}

/// What a job is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobKind {
    /// An OpenAI batch.
    Batch,
    /// One async request (submit → 202 → poll or webhook).
    Single,
}

impl JobKind {
    fn as_str(self) -> &'static str {
        match self {
            JobKind::Batch => "batch",
            JobKind::Single => "single",
        }
    }

    fn parse(s: &str) -> Result<Self, StoreError> {
        match s {
            "batch" => Ok(JobKind::Batch),
            "single" => Ok(JobKind::Single),
            other => Err(StoreError::Corrupt(format!("job kind {other:?}"))),
        }
    }
}

/// One request of a job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewItem {
    /// The client's key for it; unique in the job.
    pub custom_id: String,
    /// The request body (JSON text).
    pub body: String,
}

/// A job to create (already validated: see [`crate::input::parse`]).
#[derive(Clone, Debug)]
pub struct NewJob {
    /// Its owner; idempotency keys are per tenant.
    pub tenant: String,
    /// Batch or single.
    pub kind: JobKind,
    /// The endpoint every item calls.
    pub endpoint: String,
    /// How long it may take before it expires.
    pub completion_window_ms: u64,
    /// The input file a batch came from.
    pub input_file_id: Option<String>,
    /// The client's `Idempotency-Key`: a second create with it returns the first job.
    pub idempotency_key: Option<String>,
    /// Opaque to the store (the router keeps e.g. the webhook target and OpenAI metadata).
    pub metadata: Option<String>,
    /// The requests.
    pub items: Vec<NewItem>,
}

impl NewJob {
    /// What an idempotent retry must repeat exactly (the items, the endpoint, the window,
    /// the input file, the metadata), hashed.
    fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        let mut field = |b: &[u8]| {
            h.update((b.len() as u64).to_be_bytes());
            h.update(b);
        };
        field(self.kind.as_str().as_bytes());
        field(self.endpoint.as_bytes());
        field(&self.completion_window_ms.to_be_bytes());
        field(self.input_file_id.as_deref().unwrap_or("").as_bytes());
        field(self.metadata.as_deref().unwrap_or("").as_bytes());
        for item in &self.items {
            field(item.custom_id.as_bytes());
            field(item.body.as_bytes());
        }
        hex(&h.finalize())
    }
}

/// A job as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    /// `batch_…`.
    pub id: String,
    /// Its owner.
    pub tenant: String,
    /// Batch or single.
    pub kind: JobKind,
    /// The endpoint its items call.
    pub endpoint: String,
    /// Its status.
    pub status: BatchStatus,
    /// Its request counts.
    pub counts: RequestCounts,
    /// When it was created.
    pub created_at: UnixMs,
    /// When it expires unless finished.
    pub expires_at: UnixMs,
    /// When its cancel was persisted.
    pub cancelling_at: Option<UnixMs>,
    /// When it reached its terminal status.
    pub finished_at: Option<UnixMs>,
    /// The input file.
    pub input_file_id: Option<String>,
    /// The output file (none when no item succeeded).
    pub output_file_id: Option<String>,
    /// The error file (none when every item succeeded).
    pub error_file_id: Option<String>,
    /// The idempotency key it was created with.
    pub idempotency_key: Option<String>,
    /// The router's opaque metadata.
    pub metadata: Option<String>,
}

/// What `create_job` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Created {
    /// The job.
    pub job: Job,
    /// True when the idempotency key named a job that already existed (nothing was created).
    pub existing: bool,
}

/// A claimed item: the request to run and what completing it requires.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// Its job.
    pub job_id: String,
    /// Its index in the job (0-based input order).
    pub item: u64,
    /// The client's key.
    pub custom_id: String,
    /// The request body (JSON text).
    pub body: String,
    /// The endpoint to call.
    pub endpoint: String,
    /// Who holds it.
    pub worker: String,
    /// The fencing token: completing needs exactly this one.
    pub fence: u64,
    /// When the lease lapses unless renewed.
    pub expires_at: UnixMs,
    /// Which claim of the item this is (1 for the first).
    pub attempt: u32,
}

/// What `complete` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// How the item settled (ended, or back in the queue after an abort outside a cancel).
    pub settle: Settle,
    /// The job's status afterwards.
    pub status: BatchStatus,
    /// Whether every item of the job has ended and `finalize` is due.
    pub ready_to_finalize: bool,
}

/// An in-flight item to abort.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Abort {
    /// Its job.
    pub job_id: String,
    /// Its index.
    pub item: u64,
    /// The worker holding it.
    pub worker: String,
    /// Its current fencing token.
    pub fence: u64,
}

/// What `cancel` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CancelReport {
    /// The job, as persisted: `cancelling` (until `finalize` writes the files and makes it
    /// `cancelled`).
    pub job: Job,
    /// The in-flight items to abort now that `cancelling` is persisted.
    pub aborts: Vec<Abort>,
    /// Whether every item has ended already and `finalize` is due.
    pub ready_to_finalize: bool,
}

/// What `tick` did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TickReport {
    /// Jobs that expired now (already finalized as expired).
    pub expired: Vec<String>,
    /// Items whose lapsed lease ended them (cancelled in a cancelling job, failed when their
    /// attempts are spent).
    pub lapsed: u64,
    /// Jobs whose items have all ended and that wait for `finalize`.
    pub ready: Vec<String>,
    /// In-flight items of expired jobs, to abort.
    pub aborts: Vec<Abort>,
}

/// A webhook message for the outbox: built (and its `id` chosen) by the router; signed at each
/// attempt, since the signature covers the attempt's timestamp.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewWebhook {
    /// The `webhook-id`: the same across retries, and the outbox's dedupe key.
    pub id: String,
    /// The job it reports on.
    pub job_id: String,
    /// The target, already checked against the allow-list ([`crate::webhook::target`]).
    pub url: String,
    /// The JSON body.
    pub body: String,
}

/// A webhook handed to a worker for one attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookDelivery {
    /// The `webhook-id`.
    pub id: String,
    /// The job.
    pub job_id: String,
    /// The target.
    pub url: String,
    /// The body.
    pub body: String,
    /// Which attempt this is (1 for the first); `record_webhook` must name it.
    pub attempt: u32,
    /// Until when this attempt is the worker's; after it the message is due again (a worker
    /// that died mid-attempt; receivers dedupe by id).
    pub lease_until: UnixMs,
}

/// Where a webhook stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WebhookState {
    /// Waiting for its next attempt (`next_at`), or being attempted.
    Pending {
        /// Attempts so far.
        attempts: u32,
        /// When it is due (or its attempt's lease ends).
        next_at: UnixMs,
    },
    /// A 2xx answer.
    Delivered {
        /// Attempts it took.
        attempts: u32,
    },
    /// No more attempts (spent, or 410 Gone).
    GaveUp {
        /// Attempts made.
        attempts: u32,
    },
}

impl WebhookState {
    fn from_columns(state: &str, attempts: u32, next_at: UnixMs) -> Result<Self, StoreError> {
        Ok(match state {
            "pending" => WebhookState::Pending { attempts, next_at },
            "delivered" => WebhookState::Delivered { attempts },
            "gave_up" => WebhookState::GaveUp { attempts },
            other => return Err(StoreError::Corrupt(format!("webhook state {other:?}"))),
        })
    }
}

/// The columns `record_webhook` writes for a schedule decision.
fn webhook_columns(next: crate::webhook::schedule::Next) -> (&'static str, Option<UnixMs>) {
    use crate::webhook::schedule::Next;
    match next {
        Next::Done => ("delivered", None),
        Next::GaveUp { .. } => ("gave_up", None),
        Next::RetryAt(at) => ("pending", Some(at)),
    }
}

/// A store error: what failed and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No such job, file or item (or not the caller's).
    #[error("no {what} {id:?}")]
    NotFound {
        /// `job`, `file`, `item`.
        what: &'static str,
        /// The id asked for.
        id: String,
    },
    /// The lease is not current: it lapsed and the item was claimed again (with a higher
    /// fencing token), or the item ended (cancel, expiry, an earlier completion). The worker
    /// must drop its result; someone else owns the item now.
    #[error("stale lease on {job_id} item {item}: fencing token {fence} is not current")]
    StaleLease {
        /// The job.
        job_id: String,
        /// The item.
        item: u64,
        /// The token presented.
        fence: u64,
    },
    /// The lifecycle does not allow it (cancel a completed batch, finalize too early...).
    #[error(transparent)]
    Illegal(#[from] IllegalTransition),
    /// A file larger than `max_file_bytes`.
    #[error("file of {bytes} bytes exceeds the limit of {max} (max_file_bytes)")]
    FileTooLarge {
        /// Its size.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// A job with no item, or more than `max_items_per_job`.
    #[error("a job needs 1 to {max} items, got {count} (max_items_per_job)")]
    ItemCount {
        /// Items given.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A response or error larger than `max_result_bytes`.
    #[error("an item result of {bytes} bytes exceeds the limit of {max} (max_result_bytes)")]
    ResultTooLarge {
        /// Its size.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// A lease longer than `max_lease_ms`, or zero.
    #[error("a lease of {ms} ms is outside 1..={max} (max_lease_ms)")]
    LeaseLength {
        /// Asked for.
        ms: u64,
        /// The limit.
        max: u64,
    },
    /// The webhook attempt is not the current one (its lease ran out and another worker took
    /// the message, or it was already recorded).
    #[error("webhook {id}: attempt {attempt} is not the current one")]
    StaleDelivery {
        /// The webhook id.
        id: String,
        /// The attempt presented.
        attempt: u32,
    },
    /// A webhook body larger than `max_webhook_body_bytes`.
    #[error("a webhook body of {bytes} bytes exceeds the limit of {max} (max_webhook_body_bytes)")]
    WebhookTooLarge {
        /// Its size.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// The job is cancelling: the worker must stop the request and complete it with
    /// [`Outcome::Aborted`] (a lease is not renewed past a cancel).
    #[error("job {job_id} is cancelling: abort item {item} and complete it as aborted")]
    Cancelling {
        /// The job.
        job_id: String,
        /// The item.
        item: u64,
    },
    /// The idempotency key was used for a different request.
    #[error("idempotency key {key:?} was used for a different request (job {job_id})")]
    IdempotencyConflict {
        /// The key.
        key: String,
        /// The job it created.
        job_id: String,
    },
    /// The store's configuration is unusable (a bad schema name, an unreachable URL).
    #[error("store configuration: {0}")]
    Config(String),
    /// Something in the store this code did not write.
    #[error("corrupt store: {0}")]
    Corrupt(String),
    /// SQLite failed.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL failed (connection, query); transient ones may be retried.
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// The blocking task running a SQLite call died.
    #[error("store task failed: {0}")]
    Task(String),
    /// The OS random source failed (ids could not be made).
    #[error("random source: {0}")]
    Entropy(String),
}

impl StoreError {
    /// Whether the same call may succeed if made again (after a short backoff): the database
    /// was busy (SQLite's write lock past `busy_timeout_ms`), a transaction lost a deadlock or
    /// serialization race, or the connection broke. Everything else — a stale lease, an
    /// illegal transition, a limit — will fail the same way again.
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Sqlite(e) => matches!(
                e.sqlite_error_code(),
                Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
            ),
            StoreError::Postgres(e) => {
                use std::error::Error as _;
                let code = e.code();
                // A broken or refused connection carries the socket's I/O error.
                let io = e.source().is_some_and(|s| s.is::<std::io::Error>());
                e.is_closed()
                    || io
                    || code == Some(&tokio_postgres::error::SqlState::T_R_DEADLOCK_DETECTED)
                    || code == Some(&tokio_postgres::error::SqlState::T_R_SERIALIZATION_FAILURE)
                    || code == Some(&tokio_postgres::error::SqlState::ADMIN_SHUTDOWN)
                    || code == Some(&tokio_postgres::error::SqlState::CANNOT_CONNECT_NOW)
                    || code == Some(&tokio_postgres::error::SqlState::TOO_MANY_CONNECTIONS)
            }
            StoreError::Task(_) => true,
            _ => false,
        }
    }
}

impl From<crate::lifecycle::UnknownState> for StoreError {
    fn from(e: crate::lifecycle::UnknownState) -> Self {
        StoreError::Corrupt(e.to_string())
    }
}

/// The durable store of jobs. All methods are atomic: each either happens whole or not at
/// all, and a crash between two calls loses nothing a returned call reported.
pub trait JobStore: Send + Sync + 'static {
    /// Stores a file (refused over `max_file_bytes`).
    fn put_file(
        &self,
        file: NewFile,
        now: UnixMs,
    ) -> impl Future<Output = Result<FileMeta, StoreError>> + Send;

    /// A file and its content.
    fn file(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Option<(FileMeta, Vec<u8>)>, StoreError>> + Send;

    /// Creates a job in progress (durable on return), or returns the job its idempotency key
    /// already created (`existing`); the same key with another request is
    /// [`StoreError::IdempotencyConflict`].
    fn create_job(
        &self,
        job: NewJob,
        now: UnixMs,
    ) -> impl Future<Output = Result<Created, StoreError>> + Send;

    /// A job.
    fn job(&self, id: &str) -> impl Future<Output = Result<Option<Job>, StoreError>> + Send;

    /// A tenant's jobs of one kind, newest first, at most `limit`, after the job `after` (the
    /// last of the previous page; [`StoreError::NotFound`] unless it is the tenant's).
    fn list_jobs(
        &self,
        tenant: &str,
        kind: JobKind,
        after: Option<&str>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Job>, StoreError>> + Send;

    /// Claims up to `max` claimable items (queued, or leased with a lapsed lease whose
    /// attempts are not spent) of in-progress jobs, oldest job first, for `lease_ms`. Every
    /// claim raises the item's fencing token. Concurrent claimers never get the same item.
    fn claim(
        &self,
        worker: &str,
        max: usize,
        lease_ms: u64,
        now: UnixMs,
    ) -> impl Future<Output = Result<Vec<Lease>, StoreError>> + Send;

    /// Extends a lease that is still current (same fencing token, not ended); a lapsed lease
    /// nobody claimed yet may be renewed.
    fn renew(
        &self,
        lease: &Lease,
        lease_ms: u64,
        now: UnixMs,
    ) -> impl Future<Output = Result<Lease, StoreError>> + Send;

    /// Reports a leased item's outcome; refused as [`StoreError::StaleLease`] unless the
    /// lease's fencing token is still the item's, checked in the same write.
    fn complete(
        &self,
        lease: &Lease,
        outcome: Outcome,
        now: UnixMs,
    ) -> impl Future<Output = Result<Completion, StoreError>> + Send;

    /// Persists `cancelling` (queued items end cancelled in the same transaction) and returns
    /// the in-flight items to abort. Idempotent while cancelling: the in-flight items are
    /// returned again.
    fn cancel(
        &self,
        job_id: &str,
        now: UnixMs,
    ) -> impl Future<Output = Result<CancelReport, StoreError>> + Send;

    /// Applies time: lapsed leases in cancelling jobs end cancelled, lapsed leases with their
    /// attempts spent end failed, jobs past their window expire (finalized at once as
    /// `expired`). Lists the jobs ready to finalize.
    fn tick(&self, now: UnixMs) -> impl Future<Output = Result<TickReport, StoreError>> + Send;

    /// Writes a ready job's output and error files and takes its terminal status (completed,
    /// or cancelled). Finalizing a job already terminal returns it unchanged.
    fn finalize(
        &self,
        job_id: &str,
        now: UnixMs,
    ) -> impl Future<Output = Result<Job, StoreError>> + Send;

    /// Puts a webhook in the outbox, due now. `false`: a webhook with this id is already there
    /// (pending or done) and nothing changed.
    fn enqueue_webhook(
        &self,
        hook: NewWebhook,
        now: UnixMs,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Takes up to `max` due webhooks for one attempt each, leased for `lease_ms`; concurrent
    /// callers never get the same one.
    fn due_webhooks(
        &self,
        max: usize,
        lease_ms: u64,
        now: UnixMs,
    ) -> impl Future<Output = Result<Vec<WebhookDelivery>, StoreError>> + Send;

    /// Records what the attempt led to (decided by
    /// [`RetryPolicy::next`](crate::webhook::schedule::RetryPolicy::next)); refused as
    /// [`StoreError::StaleDelivery`] unless it is the message's current attempt.
    fn record_webhook(
        &self,
        delivery: &WebhookDelivery,
        next: crate::webhook::schedule::Next,
        now: UnixMs,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Where a webhook stands.
    fn webhook(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Option<WebhookState>, StoreError>> + Send;
}

/// Lowercase hex.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A new random id with a prefix (`file_`, `batch_`): 96 bits from the OS.
fn new_id(prefix: &str) -> Result<String, StoreError> {
    use rand::TryRngCore;
    let mut b = [0u8; 12];
    rand::rngs::OsRng.try_fill_bytes(&mut b).map_err(|e| StoreError::Entropy(e.to_string()))?;
    Ok(format!("{prefix}{}", hex(&b)))
}

/// The checks every store makes before writing a job.
fn check_new_job(job: &NewJob, limits: &Limits) -> Result<(), StoreError> {
    let count = job.items.len();
    if count == 0 || count > limits.max_items_per_job {
        return Err(StoreError::ItemCount { count, max: limits.max_items_per_job });
    }
    Ok(())
}

fn check_lease(lease_ms: u64, limits: &Limits) -> Result<(), StoreError> {
    if lease_ms == 0 || lease_ms > limits.max_lease_ms {
        return Err(StoreError::LeaseLength { ms: lease_ms, max: limits.max_lease_ms });
    }
    Ok(())
}

/// The batch status an item's own state stands for in the lifecycle's rules: an `aborting`
/// item (leased when its job's cancel was persisted) is in a cancelling batch; a `leased` one
/// in a running batch.
fn rule_status(item_state: &str) -> BatchStatus {
    if item_state == "aborting" { BatchStatus::Cancelling } else { BatchStatus::InProgress }
}

/// What an outcome writes into an item: its settle, and the `response` / `error` columns.
struct Written {
    settle: Settle,
    response: Option<String>,
    error: Option<String>,
}

fn write_outcome(
    status: BatchStatus,
    outcome: &Outcome,
    limits: &Limits,
) -> Result<Written, StoreError> {
    let settle = crate::lifecycle::settle(status, outcome);
    let (response, error) = match (outcome, settle) {
        (Outcome::Succeeded { status_code, body }, _) => {
            (Some(crate::input::response_json(*status_code, body)), None)
        }
        (Outcome::Failed(e), _) => (None, Some(crate::input::error_json(e))),
        (Outcome::Aborted, Settle::End(end)) => {
            (None, crate::lifecycle::end_error(end).map(|e| crate::input::error_json(&e)))
        }
        (Outcome::Aborted, Settle::Requeue) => (None, None),
    };
    let bytes = response.as_ref().or(error.as_ref()).map_or(0, String::len);
    if bytes > limits.max_result_bytes {
        return Err(StoreError::ResultTooLarge { bytes, max: limits.max_result_bytes });
    }
    Ok(Written { settle, response, error })
}

/// The stored error of an item that a rule (cancel, expiry, lapse) ended.
fn rule_error(end: crate::lifecycle::ItemEnd, attempts: u32) -> String {
    let e = match end {
        crate::lifecycle::ItemEnd::Failed => crate::lifecycle::attempts_exhausted(attempts),
        other => crate::lifecycle::end_error(other).unwrap_or_else(|| {
            crate::lifecycle::ItemError { code: "internal".into(), message: String::new() }
        }),
    };
    crate::input::error_json(&e)
}

/// Builds the output and error files of a job from its items in input order.
#[derive(Default)]
struct FileBuilder {
    output: Vec<u8>,
    error: Vec<u8>,
}

impl FileBuilder {
    fn add(
        &mut self,
        job_id: &str,
        item: u64,
        custom_id: &str,
        state: &str,
        response: Option<&str>,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        let end = crate::lifecycle::ItemState::parse_end(state)?
            .ok_or_else(|| StoreError::Corrupt(format!("{job_id} item {item} not ended")))?;
        let line = crate::input::result_line(job_id, item, custom_id, response, error);
        match end.file() {
            crate::lifecycle::FileKind::Output => self.output.extend_from_slice(line.as_bytes()),
            crate::lifecycle::FileKind::Error => self.error.extend_from_slice(line.as_bytes()),
        }
        Ok(())
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}
