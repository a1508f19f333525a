//! The distributed store: PostgreSQL shared by the router replicas of a region.
//!
//! Tables live in a schema of their own (`PostgresConfig::schema`, set as each connection's
//! `search_path`), created on `connect` under an advisory lock so replicas starting together
//! do not race on the DDL. Connections come from a small pool (`pool_size`), each with its
//! own connection task.
//!
//! Whether an item may be claimed, completed or renewed is decided on the item row alone,
//! under its lock: a claim needs `queued` (or `leased` with a lapsed lease and attempts left),
//! a completion the item's current fencing token in `leased` or `aborting` — the state a
//! cancel gives the items in flight, so nothing can claim them again and their abort ends
//! them `cancelled`. No call locks a job row for a claim, which keeps claims off the job row
//! that every completion's counters update.
//!
//! Locks are taken in one order everywhere — items (in index order when many), then the job
//! row — so calls wait for each other and never deadlock:
//! - `claim`: `FOR UPDATE SKIP LOCKED` on the items; concurrent claimers skip each other's
//!   rows and never get the same item; a row a cancel or an expiry changed meanwhile is
//!   re-checked against its new state (PostgreSQL's read-committed recheck) and left alone.
//! - `complete`: the item (`FOR UPDATE`, token checked), then the job's counters in one
//!   `UPDATE … RETURNING`; those updates serialize, so exactly one completion sees the last
//!   item end and moves the job to finalizing.
//! - `cancel` and expiry: every unfinished item of the job in index order, then the job's
//!   status, guarded by the status read (a job that finished meanwhile makes the cancel
//!   illegal and it rolls back).
//! - `finalize`: the job row (`FOR UPDATE`) only; its items have all ended.

use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio_postgres::{Client, GenericClient, NoTls, Row, Transaction};

use super::{
    Abort, CancelReport, Completion, Created, FileBuilder, FileMeta, Job, JobKind, JobStore, Lease,
    Limits, NewFile, NewJob, NewWebhook, StoreError, TickReport, WebhookDelivery, WebhookState,
    check_lease, check_new_job, new_id, rule_error, rule_status, to_i64, to_u64, webhook_columns,
    write_outcome,
};
use crate::lifecycle::{self, BatchStatus, ItemEnd, Lapse, Outcome, RequestCounts, Settle, UnixMs};
use crate::webhook::schedule::Next;

/// Where and how the distributed store runs.
#[derive(Clone, Debug)]
pub struct PostgresConfig {
    /// A libpq-style URL or key=value string (`postgres://user@host:5432/db`).
    pub url: String,
    /// The schema holding the tables: `[a-z_][a-z0-9_]{0,62}`.
    pub schema: String,
    /// Connections kept open (and the most calls in flight at once).
    pub pool_size: usize,
    /// The store's limits.
    pub limits: Limits,
}

impl PostgresConfig {
    /// A URL and schema with the default limits and four connections.
    pub fn new(url: impl Into<String>, schema: impl Into<String>) -> Self {
        PostgresConfig {
            url: url.into(),
            schema: schema.into(),
            pool_size: 4,
            limits: Limits::default(),
        }
    }
}

/// The PostgreSQL job store.
#[derive(Clone)]
pub struct PostgresStore {
    pool: Arc<Pool>,
    limits: Arc<Limits>,
}

struct Pool {
    url: String,
    schema: String,
    idle: std::sync::Mutex<Vec<Client>>,
    permits: Semaphore,
}

/// A pooled connection, given back on drop unless it broke.
struct Conn<'a> {
    client: Option<Client>,
    pool: &'a Pool,
    _permit: tokio::sync::SemaphorePermit<'a>,
}

impl Drop for Conn<'_> {
    fn drop(&mut self) {
        if let Some(client) = self.client.take().filter(|c| !c.is_closed()) {
            self.pool.idle.lock().unwrap_or_else(|p| p.into_inner()).push(client);
        }
    }
}

impl Conn<'_> {
    fn client(&mut self) -> Result<&mut Client, StoreError> {
        self.client.as_mut().ok_or_else(|| StoreError::Task("pooled connection taken".into()))
    }
}

impl Pool {
    async fn get(&self) -> Result<Conn<'_>, StoreError> {
        let permit = self.permits.acquire().await.map_err(|e| StoreError::Task(e.to_string()))?;
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let client = match idle.filter(|c| !c.is_closed()) {
            Some(c) => c,
            None => self.connect().await?,
        };
        Ok(Conn { client: Some(client), pool: self, _permit: permit })
    }

    async fn connect(&self) -> Result<Client, StoreError> {
        let (client, connection) = tokio_postgres::connect(&self.url, NoTls).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, "postgres job store connection ended");
            }
        });
        client.batch_execute(&format!("SET search_path TO \"{}\"", self.schema)).await?;
        Ok(client)
    }
}

fn valid_schema(name: &str) -> bool {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    first_ok
        && name.len() <= 63
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// 1: files, jobs, items; 2: the webhook outbox.
const SCHEMA_VERSION: i32 = 3;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    purpose TEXT NOT NULL,
    filename TEXT NOT NULL,
    bytes BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    content BYTEA NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    seq BIGSERIAL NOT NULL,
    tenant TEXT NOT NULL,
    kind TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    cancelling_at BIGINT,
    finished_at BIGINT,
    total BIGINT NOT NULL,
    completed BIGINT NOT NULL DEFAULT 0,
    failed BIGINT NOT NULL DEFAULT 0,
    input_file_id TEXT,
    output_file_id TEXT,
    error_file_id TEXT,
    idempotency_key TEXT,
    fingerprint TEXT NOT NULL,
    metadata TEXT,
    UNIQUE (tenant, idempotency_key)
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, expires_at);
CREATE INDEX IF NOT EXISTS jobs_tenant ON jobs (tenant, kind, created_at, id);
CREATE TABLE IF NOT EXISTS items (
    job_id TEXT NOT NULL REFERENCES jobs (id),
    idx BIGINT NOT NULL,
    custom_id TEXT NOT NULL,
    body TEXT NOT NULL,
    state TEXT NOT NULL,
    worker TEXT,
    fence BIGINT NOT NULL DEFAULT 0,
    lease_expires_at BIGINT,
    attempts INTEGER NOT NULL DEFAULT 0,
    response TEXT,
    error TEXT,
    ended_at BIGINT,
    PRIMARY KEY (job_id, idx)
);
CREATE INDEX IF NOT EXISTS items_open ON items (job_id, idx)
    WHERE state IN ('queued', 'leased', 'aborting');
CREATE INDEX IF NOT EXISTS items_leases ON items (lease_expires_at)
    WHERE state IN ('leased', 'aborting');
CREATE TABLE IF NOT EXISTS webhooks (
    id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    url TEXT NOT NULL,
    body TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    recorded INTEGER NOT NULL DEFAULT 0,
    next_at BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    finished_at BIGINT
);
CREATE INDEX IF NOT EXISTS webhooks_due ON webhooks (next_at) WHERE state = 'pending';
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
";

const JOB_COLUMNS: &str = "id, tenant, kind, endpoint, status, created_at, expires_at, \
    cancelling_at, finished_at, total, completed, failed, input_file_id, output_file_id, \
    error_file_id, idempotency_key, metadata";

fn job_from_row(row: &Row) -> Result<Job, StoreError> {
    let kind: String = row.try_get(2)?;
    let status: String = row.try_get(4)?;
    let opt = |v: Option<i64>| v.map(to_u64);
    Ok(Job {
        id: row.try_get(0)?,
        tenant: row.try_get(1)?,
        kind: JobKind::parse(&kind)?,
        endpoint: row.try_get(3)?,
        status: status.parse()?,
        created_at: to_u64(row.try_get(5)?),
        expires_at: to_u64(row.try_get(6)?),
        cancelling_at: opt(row.try_get(7)?),
        finished_at: opt(row.try_get(8)?),
        counts: RequestCounts {
            total: to_u64(row.try_get(9)?),
            completed: to_u64(row.try_get(10)?),
            failed: to_u64(row.try_get(11)?),
        },
        input_file_id: row.try_get(12)?,
        output_file_id: row.try_get(13)?,
        error_file_id: row.try_get(14)?,
        idempotency_key: row.try_get(15)?,
        metadata: row.try_get(16)?,
    })
}

/// Reads a job, taking `lock` (`FOR UPDATE`, or nothing).
async fn load_job(c: &impl GenericClient, id: &str, lock: &str) -> Result<Option<Job>, StoreError> {
    let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1 {lock}");
    c.query_opt(&sql, &[&id]).await?.map(|r| job_from_row(&r)).transpose()
}

async fn need_job(c: &impl GenericClient, id: &str, lock: &str) -> Result<Job, StoreError> {
    load_job(c, id, lock)
        .await?
        .ok_or_else(|| StoreError::NotFound { what: "job", id: id.to_owned() })
}

/// Counts ended items into the job (taking the job row's lock, after the items': the order
/// every call keeps) and applies the lifecycle's rule (the last item of a running job moves it
/// to finalizing). The counters' update serializes completions of one job, so exactly one of
/// them sees the last item end.
async fn count_ends(
    tx: &Transaction<'_>,
    job_id: &str,
    ends: &[ItemEnd],
) -> Result<Job, StoreError> {
    let output = ends.iter().filter(|e| e.file() == lifecycle::FileKind::Output).count();
    let (completed, failed) = (output as i64, (ends.len() - output) as i64);
    let sql = format!(
        "UPDATE jobs SET completed = completed + $2, failed = failed + $3 WHERE id = $1
         RETURNING {JOB_COLUMNS}"
    );
    let row = tx.query_opt(&sql, &[&job_id, &completed, &failed]).await?;
    let mut job = job_from_row(
        &row.ok_or_else(|| StoreError::NotFound { what: "job", id: job_id.to_owned() })?,
    )?;
    if let Some(next) = lifecycle::after_item_end(job.status, &job.counts) {
        job.status = job.status.become_(next)?;
        tx.execute("UPDATE jobs SET status = $2 WHERE id = $1", &[&job_id, &next.as_str()]).await?;
    }
    Ok(job)
}

/// Locks a job's unfinished items in index order, so that two calls ending many items of one
/// job (cancel, expiry) queue behind each other instead of deadlocking.
async fn lock_open_items(tx: &Transaction<'_>, job_id: &str) -> Result<(), StoreError> {
    tx.query(
        "SELECT idx FROM items WHERE job_id = $1 AND state IN ('queued', 'leased', 'aborting')
         ORDER BY idx FOR UPDATE",
        &[&job_id],
    )
    .await?;
    Ok(())
}

/// A job's items in `state` (`leased`, `aborting`), as aborts.
async fn open_items(
    tx: &Transaction<'_>,
    job_id: &str,
    state: &str,
) -> Result<Vec<Abort>, StoreError> {
    let rows = tx
        .query(
            "SELECT idx, worker, fence FROM items WHERE job_id = $1 AND state = $2 ORDER BY idx",
            &[&job_id, &state],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(Abort {
                job_id: job_id.to_owned(),
                item: to_u64(r.try_get(0)?),
                worker: r.try_get::<_, Option<String>>(1)?.unwrap_or_default(),
                fence: to_u64(r.try_get(2)?),
            })
        })
        .collect()
}

async fn insert_file(
    c: &impl GenericClient,
    file: &NewFile,
    now: UnixMs,
) -> Result<FileMeta, StoreError> {
    let id = new_id("file_")?;
    let size = file.bytes.len() as i64;
    c.execute(
        "INSERT INTO files (id, tenant, purpose, filename, bytes, created_at, content)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        &[&id, &file.tenant, &file.purpose, &file.filename, &size, &to_i64(now), &file.bytes],
    )
    .await?;
    Ok(FileMeta {
        id,
        tenant: file.tenant.clone(),
        purpose: file.purpose.clone(),
        filename: file.filename.clone(),
        bytes: file.bytes.len() as u64,
        created_at: now,
    })
}

async fn write_files(
    tx: &Transaction<'_>,
    job: &Job,
    status: BatchStatus,
    now: UnixMs,
) -> Result<(), StoreError> {
    let rows = tx
        .query(
            "SELECT idx, custom_id, state, response, error FROM items WHERE job_id = $1
             ORDER BY idx",
            &[&job.id],
        )
        .await?;
    let mut files = FileBuilder::default();
    for r in &rows {
        let state: String = r.try_get(2)?;
        let response: Option<String> = r.try_get(3)?;
        let error: Option<String> = r.try_get(4)?;
        let custom_id: String = r.try_get(1)?;
        let idx = to_u64(r.try_get(0)?);
        files.add(&job.id, idx, &custom_id, &state, response.as_deref(), error.as_deref())?;
    }
    let mut ids = [None, None];
    for (slot, (bytes, what)) in
        ids.iter_mut().zip([(files.output, "output"), (files.error, "error")])
    {
        if bytes.is_empty() {
            continue;
        }
        let file = NewFile {
            tenant: job.tenant.clone(),
            purpose: "batch_output".into(),
            filename: format!("{}_{what}.jsonl", job.id),
            bytes,
        };
        *slot = Some(insert_file(tx, &file, now).await?.id);
    }
    let [output, error] = ids;
    tx.execute(
        "UPDATE jobs SET status = $2, output_file_id = $3, error_file_id = $4, finished_at = $5
         WHERE id = $1",
        &[&job.id, &status.as_str(), &output, &error, &to_i64(now)],
    )
    .await?;
    Ok(())
}

impl PostgresStore {
    /// Connects, creates the schema and tables if missing, and keeps `pool_size` connections.
    pub async fn connect(config: PostgresConfig) -> Result<Self, StoreError> {
        let PostgresConfig { url, schema, pool_size, limits } = config;
        if !valid_schema(&schema) {
            return Err(StoreError::Config(format!(
                "schema name {schema:?} must match [a-z_][a-z0-9_]{{0,62}}"
            )));
        }
        if pool_size == 0 {
            return Err(StoreError::Config("pool_size must be at least 1".into()));
        }
        let pool = Pool {
            url,
            schema: schema.clone(),
            idle: std::sync::Mutex::new(Vec::new()),
            permits: Semaphore::new(pool_size),
        };
        {
            let mut conn = pool.get().await?;
            let tx = conn.client()?.transaction().await?;
            // One replica at a time creates the schema; the others find it made. The DDL runs
            // only when the version table is missing: `CREATE INDEX IF NOT EXISTS` takes a
            // share lock on its table even when the index exists, which would block (or
            // deadlock with) the replicas already working.
            tx.batch_execute(&format!(
                "SELECT pg_advisory_xact_lock(hashtext('edgeroute-jobs:{schema}'));
                 CREATE SCHEMA IF NOT EXISTS \"{schema}\";
                 SET LOCAL search_path TO \"{schema}\";"
            ))
            .await?;
            let made =
                tx.query_one("SELECT to_regclass('schema_version') IS NOT NULL", &[]).await?;
            let version: i32 = if made.try_get::<_, bool>(0)? {
                let row = tx.query_one("SELECT max(version) FROM schema_version", &[]).await?;
                row.try_get::<_, Option<i32>>(0)?.unwrap_or(0)
            } else {
                0
            };
            if version > SCHEMA_VERSION {
                return Err(StoreError::Config(format!(
                    "schema {schema} has version {version}, newer than this build's \
                     {SCHEMA_VERSION}"
                )));
            }
            if version < SCHEMA_VERSION {
                // Every statement is `IF NOT EXISTS`: an older schema gains what it lacks.
                tx.batch_execute(SCHEMA).await?;
                tx.execute("DELETE FROM schema_version", &[]).await?;
                tx.execute("INSERT INTO schema_version VALUES ($1)", &[&SCHEMA_VERSION]).await?;
            }
            tx.commit().await?;
        }
        Ok(PostgresStore { pool: Arc::new(pool), limits: Arc::new(limits) })
    }

    /// The store's limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Drops the store's schema and everything in it (tests; decommissioning a region).
    pub async fn drop_schema(&self) -> Result<(), StoreError> {
        let conn = self.pool.get().await?;
        let client = conn.client.as_ref().ok_or_else(|| StoreError::Task("no client".into()))?;
        client
            .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.pool.schema))
            .await?;
        Ok(())
    }

    async fn create(&self, job: NewJob, now: UnixMs) -> Result<Created, StoreError> {
        check_new_job(&job, &self.limits)?;
        let fingerprint = job.fingerprint();
        let mut conn = self.pool.get().await?;
        let tx = conn.client()?.transaction().await?;
        let id = new_id("batch_")?;
        let status = BatchStatus::Validating.become_(BatchStatus::InProgress)?;
        // ON CONFLICT waits for a concurrent create with the same key to commit, then does
        // nothing: exactly one of them creates the job.
        let inserted = tx
            .query_opt(
                "INSERT INTO jobs (id, tenant, kind, endpoint, status, created_at, expires_at,
                                   total, input_file_id, idempotency_key, fingerprint, metadata)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
                 ON CONFLICT (tenant, idempotency_key) DO NOTHING
                 RETURNING id",
                &[
                    &id,
                    &job.tenant,
                    &job.kind.as_str(),
                    &job.endpoint,
                    &status.as_str(),
                    &to_i64(now),
                    &to_i64(now.saturating_add(job.completion_window_ms)),
                    &(job.items.len() as i64),
                    &job.input_file_id,
                    &job.idempotency_key,
                    &fingerprint,
                    &job.metadata,
                ],
            )
            .await?;
        if inserted.is_none() {
            let key = job.idempotency_key.clone().unwrap_or_default();
            let row = tx
                .query_one(
                    "SELECT id, fingerprint FROM jobs WHERE tenant = $1 AND idempotency_key = $2",
                    &[&job.tenant, &key],
                )
                .await?;
            let (id, print): (String, String) = (row.try_get(0)?, row.try_get(1)?);
            if print != fingerprint {
                return Err(StoreError::IdempotencyConflict { key, job_id: id });
            }
            let job = need_job(&tx, &id, "").await?;
            tx.commit().await?;
            return Ok(Created { job, existing: true });
        }
        let idx: Vec<i64> = (0..job.items.len() as i64).collect();
        let custom_ids: Vec<&str> = job.items.iter().map(|i| i.custom_id.as_str()).collect();
        let bodies: Vec<&str> = job.items.iter().map(|i| i.body.as_str()).collect();
        tx.execute(
            "INSERT INTO items (job_id, idx, custom_id, body, state)
             SELECT $1, u.idx, u.custom_id, u.body, 'queued'
             FROM unnest($2::bigint[], $3::text[], $4::text[]) AS u (idx, custom_id, body)",
            &[&id, &idx, &custom_ids, &bodies],
        )
        .await?;
        let created = need_job(&tx, &id, "").await?;
        tx.commit().await?;
        Ok(Created { job: created, existing: false })
    }

    async fn claim_items(
        &self,
        worker: &str,
        max: usize,
        lease_ms: u64,
        now: UnixMs,
    ) -> Result<Vec<Lease>, StoreError> {
        check_lease(lease_ms, &self.limits)?;
        let max = max.min(self.limits.max_claim);
        let max_attempts = i32::try_from(self.limits.max_attempts).unwrap_or(i32::MAX);
        let (now_i, expires_at) = (to_i64(now), now.saturating_add(lease_ms));
        let conn = self.pool.get().await?;
        let client = conn.client.as_ref().ok_or_else(|| StoreError::Task("no client".into()))?;
        // The oldest jobs with something claimable; no lock: whether an item may be claimed is
        // decided on the item row itself, under its lock (below).
        let jobs = client
            .query(
                "SELECT j.id, j.endpoint FROM jobs j
                 WHERE j.status = 'in_progress' AND EXISTS (
                     SELECT 1 FROM items i WHERE i.job_id = j.id
                       AND (i.state = 'queued' OR (i.state = 'leased'
                            AND i.lease_expires_at <= $1 AND i.attempts < $2)))
                 ORDER BY j.seq
                 LIMIT $3",
                &[&now_i, &max_attempts, &(max as i64)],
            )
            .await?;
        let mut leases = Vec::with_capacity(max);
        for job in &jobs {
            let remaining = max - leases.len();
            if remaining == 0 {
                break;
            }
            let (job_id, endpoint): (String, String) = (job.try_get(0)?, job.try_get(1)?);
            // One statement: rows another claimer holds are skipped; a row a cancel or an
            // expiry changed meanwhile is re-checked against the new state and left alone.
            let rows = client
                .query(
                    "WITH picked AS (
                         SELECT idx FROM items
                         WHERE job_id = $1
                           AND (state = 'queued' OR (state = 'leased'
                                AND lease_expires_at <= $2 AND attempts < $3))
                         ORDER BY idx
                         LIMIT $4
                         FOR UPDATE SKIP LOCKED)
                     UPDATE items SET state = 'leased', worker = $5, fence = items.fence + 1,
                                      attempts = items.attempts + 1, lease_expires_at = $6
                     FROM picked
                     WHERE items.job_id = $1 AND items.idx = picked.idx
                     RETURNING items.idx, items.custom_id, items.body, items.fence,
                               items.attempts",
                    &[
                        &job_id,
                        &now_i,
                        &max_attempts,
                        &(remaining as i64),
                        &worker,
                        &to_i64(expires_at),
                    ],
                )
                .await?;
            let mut got = Vec::with_capacity(rows.len());
            for r in &rows {
                let attempts: i32 = r.try_get(4)?;
                got.push(Lease {
                    job_id: job_id.clone(),
                    item: to_u64(r.try_get(0)?),
                    custom_id: r.try_get(1)?,
                    body: r.try_get(2)?,
                    fence: to_u64(r.try_get(3)?),
                    attempt: u32::try_from(attempts).unwrap_or(0),
                    endpoint: endpoint.clone(),
                    worker: worker.to_owned(),
                    expires_at,
                });
            }
            // RETURNING has no order: the job's first items first.
            got.sort_by_key(|l| l.item);
            leases.extend(got);
        }
        Ok(leases)
    }

    async fn complete_item(
        &self,
        lease: &Lease,
        outcome: &Outcome,
        now: UnixMs,
    ) -> Result<Completion, StoreError> {
        let mut conn = self.pool.get().await?;
        let tx = conn.client()?.transaction().await?;
        let (item, fence) = (to_i64(lease.item), to_i64(lease.fence));
        // The item first (its lock), then the job's counters: the order every call keeps.
        let current = tx
            .query_opt(
                "SELECT state FROM items
                 WHERE job_id = $1 AND idx = $2 AND fence = $3 AND state IN ('leased', 'aborting')
                 FOR UPDATE",
                &[&lease.job_id, &item, &fence],
            )
            .await?;
        let Some(current) = current else {
            if load_job(&tx, &lease.job_id, "").await?.is_none() {
                return Err(StoreError::NotFound { what: "job", id: lease.job_id.clone() });
            }
            return Err(StoreError::StaleLease {
                job_id: lease.job_id.clone(),
                item: lease.item,
                fence: lease.fence,
            });
        };
        let state: String = current.try_get(0)?;
        let written = write_outcome(rule_status(&state), outcome, &self.limits)?;
        let end = match written.settle {
            Settle::Requeue => {
                tx.execute(
                    "UPDATE items SET state = 'queued', worker = NULL, lease_expires_at = NULL
                     WHERE job_id = $1 AND idx = $2",
                    &[&lease.job_id, &item],
                )
                .await?;
                None
            }
            Settle::End(end) => {
                tx.execute(
                    "UPDATE items SET state = $3, worker = NULL, lease_expires_at = NULL,
                                      response = $4, error = $5, ended_at = $6
                     WHERE job_id = $1 AND idx = $2",
                    &[
                        &lease.job_id,
                        &item,
                        &end.as_str(),
                        &written.response,
                        &written.error,
                        &to_i64(now),
                    ],
                )
                .await?;
                Some(end)
            }
        };
        let job = match end {
            Some(end) => count_ends(&tx, &lease.job_id, &[end]).await?,
            None => need_job(&tx, &lease.job_id, "").await?,
        };
        tx.commit().await?;
        Ok(Completion {
            settle: written.settle,
            status: job.status,
            ready_to_finalize: lifecycle::ready_to_finalize(job.status, &job.counts),
        })
    }

    async fn renew_lease(
        &self,
        lease: &Lease,
        lease_ms: u64,
        now: UnixMs,
    ) -> Result<Lease, StoreError> {
        check_lease(lease_ms, &self.limits)?;
        let conn = self.pool.get().await?;
        let client = conn.client.as_ref().ok_or_else(|| StoreError::Task("no client".into()))?;
        let expires_at = now.saturating_add(lease_ms);
        let (item, fence) = (to_i64(lease.item), to_i64(lease.fence));
        let renewed = client
            .execute(
                "UPDATE items SET lease_expires_at = $4
                 WHERE job_id = $1 AND idx = $2 AND fence = $3 AND state = 'leased'",
                &[&lease.job_id, &item, &fence, &to_i64(expires_at)],
            )
            .await?;
        if renewed == 1 {
            return Ok(Lease { expires_at, ..lease.clone() });
        }
        let aborting = client
            .query_opt(
                "SELECT 1 FROM items
                 WHERE job_id = $1 AND idx = $2 AND fence = $3 AND state = 'aborting'",
                &[&lease.job_id, &item, &fence],
            )
            .await?;
        if aborting.is_some() {
            return Err(StoreError::Cancelling { job_id: lease.job_id.clone(), item: lease.item });
        }
        Err(StoreError::StaleLease {
            job_id: lease.job_id.clone(),
            item: lease.item,
            fence: lease.fence,
        })
    }

    async fn cancel_job(&self, job_id: &str, now: UnixMs) -> Result<CancelReport, StoreError> {
        let mut conn = self.pool.get().await?;
        let tx = conn.client()?.transaction().await?;
        let job = need_job(&tx, job_id, "").await?;
        let (next, new) = lifecycle::cancel(job.status)?;
        if new {
            lock_open_items(&tx, job_id).await?;
            let n = tx
                .execute(
                    "UPDATE items SET state = 'cancelled', error = $2, ended_at = $3
                     WHERE job_id = $1 AND state = 'queued'",
                    &[&job_id, &rule_error(ItemEnd::Cancelled, 0), &to_i64(now)],
                )
                .await?;
            tx.execute(
                "UPDATE items SET state = 'aborting' WHERE job_id = $1 AND state = 'leased'",
                &[&job_id],
            )
            .await?;
            // The status moves only from the one it was read in: a completion that finished
            // the job meanwhile (finalizing) makes this cancel illegal, and it rolls back.
            let moved = tx
                .execute(
                    "UPDATE jobs SET status = $2, cancelling_at = $3, failed = failed + $4
                     WHERE id = $1 AND status = $5",
                    &[&job_id, &next.as_str(), &to_i64(now), &to_i64(n), &job.status.as_str()],
                )
                .await?;
            if moved == 0 {
                let current = need_job(&tx, job_id, "").await?.status;
                lifecycle::cancel(current)?;
            }
        }
        let job = need_job(&tx, job_id, "").await?;
        let aborts = open_items(&tx, job_id, "aborting").await?;
        tx.commit().await?;
        Ok(CancelReport {
            ready_to_finalize: lifecycle::ready_to_finalize(job.status, &job.counts),
            job,
            aborts,
        })
    }

    async fn tick_once(&self, now: UnixMs) -> Result<TickReport, StoreError> {
        let mut report = TickReport::default();
        let mut conn = self.pool.get().await?;
        let now_i = to_i64(now);
        let due = conn
            .client()?
            .query(
                "SELECT id FROM jobs WHERE status IN ('validating', 'in_progress')
                   AND expires_at <= $1 ORDER BY seq",
                &[&now_i],
            )
            .await?;
        for row in &due {
            let id: String = row.try_get(0)?;
            // One transaction per job; another replica's tick doing the same loses the race
            // on the status guard and rolls back.
            let tx = conn.client()?.transaction().await?;
            let job = need_job(&tx, &id, "").await?;
            let window = job.expires_at.saturating_sub(job.created_at);
            if !lifecycle::is_expired(job.status, job.created_at, window, now) {
                continue;
            }
            let status = job.status.become_(BatchStatus::Expired)?;
            lock_open_items(&tx, &id).await?;
            let aborts = open_items(&tx, &id, "leased").await?;
            let n = tx
                .execute(
                    "UPDATE items SET state = 'expired', worker = NULL, lease_expires_at = NULL,
                                      error = $2, ended_at = $3
                     WHERE job_id = $1 AND state IN ('queued', 'leased', 'aborting')",
                    &[&id, &rule_error(ItemEnd::Expired, 0), &now_i],
                )
                .await?;
            let moved = tx
                .execute(
                    "UPDATE jobs SET status = $2, failed = failed + $3 WHERE id = $1 AND status = $4",
                    &[&id, &status.as_str(), &to_i64(n), &job.status.as_str()],
                )
                .await?;
            if moved == 0 {
                continue; // Dropping the transaction rolls it back.
            }
            let job = need_job(&tx, &id, "").await?;
            write_files(&tx, &job, status, now).await?;
            tx.commit().await?;
            report.expired.push(id);
            report.aborts.extend(aborts);
        }
        let max_attempts = i32::try_from(self.limits.max_attempts).unwrap_or(i32::MAX);
        let tx = conn.client()?.transaction().await?;
        let lapsed = tx
            .query(
                "SELECT job_id, idx, attempts, state FROM items
                 WHERE state IN ('leased', 'aborting') AND lease_expires_at <= $1
                   AND (state = 'aborting' OR attempts >= $2)
                 ORDER BY job_id, idx
                 FOR UPDATE SKIP LOCKED",
                &[&now_i, &max_attempts],
            )
            .await?;
        let mut ends: std::collections::BTreeMap<String, Vec<ItemEnd>> = Default::default();
        for it in &lapsed {
            let (job_id, idx): (String, i64) = (it.try_get(0)?, it.try_get(1)?);
            let attempts = u32::try_from(it.try_get::<_, i32>(2)?).unwrap_or(0);
            let state: String = it.try_get(3)?;
            let lapse = lifecycle::lapse(rule_status(&state), attempts, self.limits.max_attempts);
            let Lapse::End(end) = lapse else { continue };
            tx.execute(
                "UPDATE items SET state = $3, worker = NULL, lease_expires_at = NULL,
                                  error = $4, ended_at = $5
                 WHERE job_id = $1 AND idx = $2",
                &[&job_id, &idx, &end.as_str(), &rule_error(end, attempts), &now_i],
            )
            .await?;
            ends.entry(job_id).or_default().push(end);
            report.lapsed += 1;
        }
        for (job_id, ends) in &ends {
            count_ends(&tx, job_id, ends).await?;
        }
        tx.commit().await?;
        let ready = conn
            .client()?
            .query(
                "SELECT id FROM jobs WHERE status IN ('finalizing', 'cancelling')
                   AND completed + failed >= total ORDER BY seq",
                &[],
            )
            .await?;
        report.ready = ready.iter().map(|r| r.try_get(0)).collect::<Result<_, _>>()?;
        Ok(report)
    }

    async fn finalize_job(&self, job_id: &str, now: UnixMs) -> Result<Job, StoreError> {
        let mut conn = self.pool.get().await?;
        let tx = conn.client()?.transaction().await?;
        let job = need_job(&tx, job_id, "FOR UPDATE").await?;
        if job.status.is_terminal() {
            return Ok(job);
        }
        if !lifecycle::ready_to_finalize(job.status, &job.counts) {
            let e = lifecycle::IllegalTransition { from: job.status, to: BatchStatus::Completed };
            return Err(e.into());
        }
        let status = lifecycle::final_status(job.status)?;
        write_files(&tx, &job, status, now).await?;
        let job = need_job(&tx, job_id, "").await?;
        tx.commit().await?;
        Ok(job)
    }
}

impl JobStore for PostgresStore {
    async fn put_file(&self, file: NewFile, now: UnixMs) -> Result<FileMeta, StoreError> {
        if file.bytes.len() > self.limits.max_file_bytes {
            let (bytes, max) = (file.bytes.len(), self.limits.max_file_bytes);
            return Err(StoreError::FileTooLarge { bytes, max });
        }
        let conn = self.pool.get().await?;
        let client = conn.client.as_ref().ok_or_else(|| StoreError::Task("no client".into()))?;
        insert_file(client, &file, now).await
    }

    async fn file(&self, id: &str) -> Result<Option<(FileMeta, Vec<u8>)>, StoreError> {
        let conn = self.pool.get().await?;
        let client = conn.client.as_ref().ok_or_else(|| StoreError::Task("no client".into()))?;
        let row = client
            .query_opt(
                "SELECT id, tenant, purpose, filename, bytes, created_at, content
                 FROM files WHERE id = $1",
                &[&id],
            )
            .await?;
        row.map(|r| {
            let meta = FileMeta {
                id: r.try_get(0)?,
                tenant: r.try_get(1)?,
                purpose: r.try_get(2)?,
                filename: r.try_get(3)?,
                bytes: to_u64(r.try_get(4)?),
                created_at: to_u64(r.try_get(5)?),
            };
            Ok((meta, r.try_get(6)?))
        })
        .transpose()
    }

    async fn create_job(&self, job: NewJob, now: UnixMs) -> Result<Created, StoreError> {
        self.create(job, now).await
    }

    async fn job(&self, id: &str) -> Result<Option<Job>, StoreError> {
        let conn = self.pool.get().await?;
        let client = conn.client.as_ref().ok_or_else(|| StoreError::Task("no client".into()))?;
        load_job(client, id, "").await
    }

    async fn list_jobs(
        &self,
        tenant: &str,
        kind: JobKind,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Job>, StoreError> {
        let conn = self.pool.get().await?;
        let client = conn.client.as_ref().ok_or_else(|| StoreError::Task("no client".into()))?;
        // Newest first; `after` is the last id of the previous page (its owner's only).
        let (at, id) = match after {
            Some(id) => match load_job(client, id, "").await? {
                Some(j) if j.tenant == tenant => (j.created_at as i64, j.id),
                _ => return Err(StoreError::NotFound { what: "job", id: id.to_owned() }),
            },
            None => (i64::MAX, String::new()),
        };
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE tenant = $1 AND kind = $2
               AND (created_at < $3 OR (created_at = $3 AND id < $4) OR $5)
             ORDER BY created_at DESC, id DESC LIMIT $6"
        );
        let rows = client
            .query(&sql, &[&tenant, &kind.as_str(), &at, &id, &after.is_none(), &(limit as i64)])
            .await?;
        rows.iter().map(job_from_row).collect()
    }

    async fn claim(
        &self,
        worker: &str,
        max: usize,
        lease_ms: u64,
        now: UnixMs,
    ) -> Result<Vec<Lease>, StoreError> {
        self.claim_items(worker, max, lease_ms, now).await
    }

    async fn renew(&self, lease: &Lease, lease_ms: u64, now: UnixMs) -> Result<Lease, StoreError> {
        self.renew_lease(lease, lease_ms, now).await
    }

    async fn complete(
        &self,
        lease: &Lease,
        outcome: Outcome,
        now: UnixMs,
    ) -> Result<Completion, StoreError> {
        self.complete_item(lease, &outcome, now).await
    }

    async fn cancel(&self, job_id: &str, now: UnixMs) -> Result<CancelReport, StoreError> {
        self.cancel_job(job_id, now).await
    }

    async fn tick(&self, now: UnixMs) -> Result<TickReport, StoreError> {
        self.tick_once(now).await
    }

    async fn finalize(&self, job_id: &str, now: UnixMs) -> Result<Job, StoreError> {
        self.finalize_job(job_id, now).await
    }

    async fn enqueue_webhook(&self, hook: NewWebhook, now: UnixMs) -> Result<bool, StoreError> {
        let max = self.limits.max_webhook_body_bytes;
        if hook.body.len() > max {
            return Err(StoreError::WebhookTooLarge { bytes: hook.body.len(), max });
        }
        let conn = self.pool.get().await?;
        let client = conn.client.as_ref().ok_or_else(|| StoreError::Task("no client".into()))?;
        let n = client
            .execute(
                "INSERT INTO webhooks (id, job_id, url, body, state, next_at, created_at)
                 VALUES ($1, $2, $3, $4, 'pending', $5, $5) ON CONFLICT (id) DO NOTHING",
                &[&hook.id, &hook.job_id, &hook.url, &hook.body, &to_i64(now)],
            )
            .await?;
        Ok(n == 1)
    }

    async fn due_webhooks(
        &self,
        max: usize,
        lease_ms: u64,
        now: UnixMs,
    ) -> Result<Vec<WebhookDelivery>, StoreError> {
        check_lease(lease_ms, &self.limits)?;
        let max = max.min(self.limits.max_claim) as i64;
        let lease_until = now.saturating_add(lease_ms);
        let conn = self.pool.get().await?;
        let client = conn.client.as_ref().ok_or_else(|| StoreError::Task("no client".into()))?;
        let rows = client
            .query(
                "WITH picked AS (
                     SELECT id FROM webhooks WHERE state = 'pending' AND next_at <= $1
                     ORDER BY next_at, id LIMIT $2 FOR UPDATE SKIP LOCKED)
                 UPDATE webhooks w SET attempts = w.attempts + 1, next_at = $3
                 FROM picked WHERE w.id = picked.id
                 RETURNING w.id, w.job_id, w.url, w.body, w.attempts",
                &[&to_i64(now), &max, &to_i64(lease_until)],
            )
            .await?;
        let mut out = rows
            .iter()
            .map(|r| {
                Ok(WebhookDelivery {
                    id: r.try_get(0)?,
                    job_id: r.try_get(1)?,
                    url: r.try_get(2)?,
                    body: r.try_get(3)?,
                    attempt: u32::try_from(r.try_get::<_, i32>(4)?).unwrap_or(0),
                    lease_until,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    async fn record_webhook(
        &self,
        delivery: &WebhookDelivery,
        next: Next,
        now: UnixMs,
    ) -> Result<(), StoreError> {
        let (state, next_at) = webhook_columns(next);
        let finished_at = next_at.is_none().then_some(to_i64(now));
        let attempt = i32::try_from(delivery.attempt).unwrap_or(i32::MAX);
        let conn = self.pool.get().await?;
        let client = conn.client.as_ref().ok_or_else(|| StoreError::Task("no client".into()))?;
        let n = client
            .execute(
                "UPDATE webhooks SET state = $3, next_at = coalesce($4, next_at),
                                     finished_at = $5, recorded = attempts
                 WHERE id = $1 AND attempts = $2 AND recorded < attempts AND state = 'pending'",
                &[&delivery.id, &attempt, &state, &next_at.map(to_i64), &finished_at],
            )
            .await?;
        if n == 0 {
            return Err(StoreError::StaleDelivery {
                id: delivery.id.clone(),
                attempt: delivery.attempt,
            });
        }
        Ok(())
    }

    async fn webhook(&self, id: &str) -> Result<Option<WebhookState>, StoreError> {
        let conn = self.pool.get().await?;
        let client = conn.client.as_ref().ok_or_else(|| StoreError::Task("no client".into()))?;
        let row = client
            .query_opt("SELECT state, attempts, next_at FROM webhooks WHERE id = $1", &[&id])
            .await?;
        row.map(|r| {
            let (state, attempts, next_at): (String, i32, i64) =
                (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?);
            WebhookState::from_columns(
                &state,
                u32::try_from(attempts).unwrap_or(0),
                to_u64(next_at),
            )
        })
        .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::valid_schema;

    #[test]
    fn schema_names_are_plain_identifiers() {
        assert!(valid_schema("jobs_test_1"));
        assert!(valid_schema("_x"));
        for bad in ["", "1abc", "Jobs", "a-b", "a\"; drop", &"a".repeat(64)] {
            assert!(!valid_schema(bad), "{bad:?}");
        }
    }
}
