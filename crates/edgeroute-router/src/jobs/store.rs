//! The store a router replica was configured with: the embedded SQLite file or a regional
//! PostgreSQL, behind one type (the [`JobStore`] trait's methods return `impl Future`, so the
//! choice made at start-up is an enum, not a trait object).

use edgeroute_jobs::webhook::schedule::Next;
use edgeroute_jobs::{
    CancelReport, Completion, Created, FileMeta, Job, JobKind, JobStore, Lease, Limits, NewFile,
    NewJob, NewWebhook, Outcome, PostgresConfig, PostgresStore, SqliteConfig, SqliteStore,
    StoreError, TickReport, UnixMs, WebhookDelivery, WebhookState,
};

/// One of the two stores.
#[derive(Clone)]
pub enum AnyStore {
    Sqlite(SqliteStore),
    Postgres(PostgresStore),
}

impl AnyStore {
    /// Opens `sqlite:<path>` or connects to `postgres://…` (creating the schema if missing).
    pub async fn open(url: &str, schema: &str) -> Result<AnyStore, StoreError> {
        match url.strip_prefix("sqlite:") {
            Some(path) => {
                Ok(AnyStore::Sqlite(SqliteStore::open(SqliteConfig::new(path.to_owned())).await?))
            }
            None => Ok(AnyStore::Postgres(
                PostgresStore::connect(PostgresConfig::new(url.to_owned(), schema.to_owned()))
                    .await?,
            )),
        }
    }

    pub fn limits(&self) -> &Limits {
        match self {
            AnyStore::Sqlite(s) => s.limits(),
            AnyStore::Postgres(s) => s.limits(),
        }
    }
}

/// Each method is the chosen store's.
macro_rules! delegate {
    ($self:ident, $s:ident => $call:expr) => {
        match $self {
            AnyStore::Sqlite($s) => $call.await,
            AnyStore::Postgres($s) => $call.await,
        }
    };
}

impl JobStore for AnyStore {
    async fn put_file(&self, file: NewFile, now: UnixMs) -> Result<FileMeta, StoreError> {
        delegate!(self, s => s.put_file(file, now))
    }
    async fn file(&self, id: &str) -> Result<Option<(FileMeta, Vec<u8>)>, StoreError> {
        delegate!(self, s => s.file(id))
    }
    async fn create_job(&self, job: NewJob, now: UnixMs) -> Result<Created, StoreError> {
        delegate!(self, s => s.create_job(job, now))
    }
    async fn job(&self, id: &str) -> Result<Option<Job>, StoreError> {
        delegate!(self, s => s.job(id))
    }
    async fn list_jobs(
        &self,
        tenant: &str,
        kind: JobKind,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Job>, StoreError> {
        delegate!(self, s => s.list_jobs(tenant, kind, after, limit))
    }
    async fn claim(
        &self,
        worker: &str,
        max: usize,
        lease_ms: u64,
        now: UnixMs,
    ) -> Result<Vec<Lease>, StoreError> {
        delegate!(self, s => s.claim(worker, max, lease_ms, now))
    }
    async fn renew(&self, lease: &Lease, lease_ms: u64, now: UnixMs) -> Result<Lease, StoreError> {
        delegate!(self, s => s.renew(lease, lease_ms, now))
    }
    async fn complete(
        &self,
        lease: &Lease,
        outcome: Outcome,
        now: UnixMs,
    ) -> Result<Completion, StoreError> {
        delegate!(self, s => s.complete(lease, outcome, now))
    }
    async fn cancel(&self, job_id: &str, now: UnixMs) -> Result<CancelReport, StoreError> {
        delegate!(self, s => s.cancel(job_id, now))
    }
    async fn tick(&self, now: UnixMs) -> Result<TickReport, StoreError> {
        delegate!(self, s => s.tick(now))
    }
    async fn finalize(&self, job_id: &str, now: UnixMs) -> Result<Job, StoreError> {
        delegate!(self, s => s.finalize(job_id, now))
    }
    async fn enqueue_webhook(&self, hook: NewWebhook, now: UnixMs) -> Result<bool, StoreError> {
        delegate!(self, s => s.enqueue_webhook(hook, now))
    }
    async fn due_webhooks(
        &self,
        max: usize,
        lease_ms: u64,
        now: UnixMs,
    ) -> Result<Vec<WebhookDelivery>, StoreError> {
        delegate!(self, s => s.due_webhooks(max, lease_ms, now))
    }
    async fn record_webhook(
        &self,
        delivery: &WebhookDelivery,
        next: Next,
        now: UnixMs,
    ) -> Result<(), StoreError> {
        delegate!(self, s => s.record_webhook(delivery, next, now))
    }
    async fn webhook(&self, id: &str) -> Result<Option<WebhookState>, StoreError> {
        delegate!(self, s => s.webhook(id))
    }
}
