//! The embedded store: one SQLite file in WAL mode with `synchronous = FULL` (a returned call
//! survives a crash or a power cut), compiled in (`rusqlite`'s `bundled`). Every call runs on
//! tokio's blocking pool, one connection per store behind a mutex; every write is one
//! `BEGIN IMMEDIATE` transaction, so writers never interleave — several stores (or
//! processes) on one file serialize on SQLite's write lock, waiting up to `busy_timeout_ms`.
//!
//! Layout: tables `files` (content as a BLOB), `jobs`, `items` (primary key `(job_id, idx)`);
//! `schema_version` in `PRAGMA user_version`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};

use super::{
    Abort, CancelReport, Completion, Created, FileBuilder, FileMeta, Job, JobKind, JobStore, Lease,
    Limits, NewFile, NewJob, NewWebhook, StoreError, TickReport, WebhookDelivery, WebhookState,
    check_lease, check_new_job, new_id, rule_error, rule_status, to_i64, to_u64, webhook_columns,
    write_outcome,
};
use crate::lifecycle::{self, BatchStatus, ItemEnd, Lapse, Outcome, RequestCounts, Settle, UnixMs};
use crate::webhook::schedule::Next;

/// Where and how the embedded store runs.
#[derive(Clone, Debug)]
pub struct SqliteConfig {
    /// The database file (created if missing; `-wal` and `-shm` files sit beside it).
    pub path: PathBuf,
    /// The store's limits.
    pub limits: Limits,
    /// How long a write waits for another connection's write lock before failing.
    pub busy_timeout_ms: u64,
}

impl SqliteConfig {
    /// A file with the default limits and a 5 s busy timeout.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        SqliteConfig { path: path.into(), limits: Limits::default(), busy_timeout_ms: 5_000 }
    }
}

/// The SQLite job store.
#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    limits: Arc<Limits>,
}

/// 1: files, jobs, items; 2: the webhook outbox (every statement `IF NOT EXISTS`, so an older
/// file gains what it lacks).
const SCHEMA_VERSION: i64 = 3;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    purpose TEXT NOT NULL,
    filename TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    content BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    kind TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    cancelling_at INTEGER,
    finished_at INTEGER,
    total INTEGER NOT NULL,
    completed INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
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
    idx INTEGER NOT NULL,
    custom_id TEXT NOT NULL,
    body TEXT NOT NULL,
    state TEXT NOT NULL,
    worker TEXT,
    fence INTEGER NOT NULL DEFAULT 0,
    lease_expires_at INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    response TEXT,
    error TEXT,
    ended_at INTEGER,
    PRIMARY KEY (job_id, idx)
);
CREATE INDEX IF NOT EXISTS items_open ON items (state, job_id, idx)
    WHERE state IN ('queued', 'leased', 'aborting');
CREATE TABLE IF NOT EXISTS webhooks (
    id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    url TEXT NOT NULL,
    body TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    recorded INTEGER NOT NULL DEFAULT 0,
    next_at INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    finished_at INTEGER
);
CREATE INDEX IF NOT EXISTS webhooks_due ON webhooks (next_at) WHERE state = 'pending';
";

const JOB_COLUMNS: &str = "id, tenant, kind, endpoint, status, created_at, expires_at, \
    cancelling_at, finished_at, total, completed, failed, input_file_id, output_file_id, \
    error_file_id, idempotency_key, metadata";

fn job_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Result<Job, StoreError>> {
    let kind: String = row.get(2)?;
    let status: String = row.get(4)?;
    let opt_u64 = |v: Option<i64>| v.map(to_u64);
    let job = (|| -> Result<Job, StoreError> {
        Ok(Job {
            id: row.get(0)?,
            tenant: row.get(1)?,
            kind: JobKind::parse(&kind)?,
            endpoint: row.get(3)?,
            status: status.parse()?,
            created_at: to_u64(row.get(5)?),
            expires_at: to_u64(row.get(6)?),
            cancelling_at: opt_u64(row.get(7)?),
            finished_at: opt_u64(row.get(8)?),
            counts: RequestCounts {
                total: to_u64(row.get(9)?),
                completed: to_u64(row.get(10)?),
                failed: to_u64(row.get(11)?),
            },
            input_file_id: row.get(12)?,
            output_file_id: row.get(13)?,
            error_file_id: row.get(14)?,
            idempotency_key: row.get(15)?,
            metadata: row.get(16)?,
        })
    })();
    Ok(job)
}

fn load_job(tx: &Connection, id: &str) -> Result<Option<Job>, StoreError> {
    let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1");
    tx.query_row(&sql, [id], job_from_row).optional()?.transpose()
}

fn need_job(tx: &Connection, id: &str) -> Result<Job, StoreError> {
    load_job(tx, id)?.ok_or_else(|| StoreError::NotFound { what: "job", id: id.to_owned() })
}

impl SqliteStore {
    /// Opens (creating if needed) the store file.
    pub async fn open(config: SqliteConfig) -> Result<Self, StoreError> {
        let SqliteConfig { path, limits, busy_timeout_ms } = config;
        let conn = tokio::task::spawn_blocking(move || -> Result<Connection, StoreError> {
            let conn = Connection::open(&path)?;
            conn.busy_timeout(std::time::Duration::from_millis(busy_timeout_ms))?;
            let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
            if !mode.eq_ignore_ascii_case("wal") {
                return Err(StoreError::Config(format!(
                    "{} cannot use WAL (journal_mode is {mode})",
                    path.display()
                )));
            }
            conn.execute_batch("PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;")?;
            let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
            if version > SCHEMA_VERSION {
                return Err(StoreError::Config(format!(
                    "{} has schema version {version}, newer than this build's {SCHEMA_VERSION}",
                    path.display()
                )));
            }
            // A file already at this version is opened without a write (another process may
            // be holding the write lock).
            if version < SCHEMA_VERSION {
                conn.execute_batch(&format!(
                    "BEGIN IMMEDIATE; {SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
                ))?;
            }
            Ok(conn)
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))??;
        Ok(SqliteStore { conn: Arc::new(Mutex::new(conn)), limits: Arc::new(limits) })
    }

    /// The store's limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Runs `f` in one immediate transaction on the blocking pool; commits when it returns
    /// `Ok`.
    async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>, &Limits) -> Result<T, StoreError> + Send + 'static,
    {
        let conn = Arc::clone(&self.conn);
        let limits = Arc::clone(&self.limits);
        tokio::task::spawn_blocking(move || {
            // A panic in another call poisons the lock, not the database: SQLite rolled that
            // transaction back, so the connection is sound.
            let mut conn = conn.lock().unwrap_or_else(|p| p.into_inner());
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let out = f(&tx, &limits)?;
            tx.commit()?;
            Ok(out)
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }

    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let conn = Arc::clone(&self.conn);
        tokio::task::spawn_blocking(move || {
            let conn = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&conn)
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }
}

fn add_counts(tx: &Connection, job_id: &str, end: ItemEnd, n: u64) -> Result<(), StoreError> {
    let column = match end.file() {
        lifecycle::FileKind::Output => "completed",
        lifecycle::FileKind::Error => "failed",
    };
    let sql = format!("UPDATE jobs SET {column} = {column} + ?2 WHERE id = ?1");
    tx.execute(&sql, params![job_id, to_i64(n)])?;
    Ok(())
}

/// After items ended: the status the lifecycle asks for (in_progress → finalizing).
fn follow_item_end(tx: &Connection, job_id: &str) -> Result<Job, StoreError> {
    let job = need_job(tx, job_id)?;
    if let Some(next) = lifecycle::after_item_end(job.status, &job.counts) {
        job.status.become_(next)?;
        tx.execute("UPDATE jobs SET status = ?2 WHERE id = ?1", params![job_id, next.as_str()])?;
        return need_job(tx, job_id);
    }
    Ok(job)
}

/// A job's items in `state` (`leased`, `aborting`), as aborts.
fn in_flight(tx: &Connection, job_id: &str, state: &str) -> Result<Vec<Abort>, StoreError> {
    let mut stmt = tx.prepare(
        "SELECT idx, worker, fence FROM items WHERE job_id = ?1 AND state = ?2 ORDER BY idx",
    )?;
    let rows = stmt.query_map([job_id, state], |r| {
        Ok(Abort {
            job_id: job_id.to_owned(),
            item: to_u64(r.get(0)?),
            worker: r.get::<_, Option<String>>(1)?.unwrap_or_default(),
            fence: to_u64(r.get(2)?),
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn insert_file(tx: &Connection, file: &NewFile, now: UnixMs) -> Result<FileMeta, StoreError> {
    let id = new_id("file_")?;
    tx.execute(
        "INSERT INTO files (id, tenant, purpose, filename, bytes, created_at, content)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            id,
            file.tenant,
            file.purpose,
            file.filename,
            file.bytes.len() as i64,
            to_i64(now),
            file.bytes
        ],
    )?;
    Ok(FileMeta {
        id,
        tenant: file.tenant.clone(),
        purpose: file.purpose.clone(),
        filename: file.filename.clone(),
        bytes: file.bytes.len() as u64,
        created_at: now,
    })
}

/// Writes the result files of a job whose items have all ended and gives it `status`.
fn write_files(
    tx: &Connection,
    job: &Job,
    status: BatchStatus,
    now: UnixMs,
) -> Result<(), StoreError> {
    let mut files = FileBuilder::default();
    {
        let mut stmt = tx.prepare(
            "SELECT idx, custom_id, state, response, error FROM items WHERE job_id = ?1
             ORDER BY idx",
        )?;
        let mut rows = stmt.query([&job.id])?;
        while let Some(r) = rows.next()? {
            let state: String = r.get(2)?;
            let response: Option<String> = r.get(3)?;
            let error: Option<String> = r.get(4)?;
            let custom_id: String = r.get(1)?;
            let idx = to_u64(r.get(0)?);
            files.add(&job.id, idx, &custom_id, &state, response.as_deref(), error.as_deref())?;
        }
    }
    let store = |bytes: Vec<u8>, what: &str| -> Result<Option<String>, StoreError> {
        if bytes.is_empty() {
            return Ok(None);
        }
        let file = NewFile {
            tenant: job.tenant.clone(),
            purpose: "batch_output".into(),
            filename: format!("{}_{what}.jsonl", job.id),
            bytes,
        };
        Ok(Some(insert_file(tx, &file, now)?.id))
    };
    let output = store(files.output, "output")?;
    let error = store(files.error, "error")?;
    tx.execute(
        "UPDATE jobs SET status = ?2, output_file_id = ?3, error_file_id = ?4, finished_at = ?5
         WHERE id = ?1",
        params![job.id, status.as_str(), output, error, to_i64(now)],
    )?;
    Ok(())
}

fn create(
    tx: &Transaction<'_>,
    job: NewJob,
    now: UnixMs,
    limits: &Limits,
) -> Result<Created, StoreError> {
    check_new_job(&job, limits)?;
    let fingerprint = job.fingerprint();
    if let Some(key) = &job.idempotency_key {
        let found: Option<(String, String)> = tx
            .query_row(
                "SELECT id, fingerprint FROM jobs WHERE tenant = ?1 AND idempotency_key = ?2",
                params![job.tenant, key],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        if let Some((id, print)) = found {
            if print != fingerprint {
                return Err(StoreError::IdempotencyConflict { key: key.clone(), job_id: id });
            }
            return Ok(Created { job: need_job(tx, &id)?, existing: true });
        }
    }
    let id = new_id("batch_")?;
    let status = BatchStatus::Validating.become_(BatchStatus::InProgress)?;
    tx.execute(
        "INSERT INTO jobs (id, tenant, kind, endpoint, status, created_at, expires_at, total,
                           input_file_id, idempotency_key, fingerprint, metadata)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
        params![
            id,
            job.tenant,
            job.kind.as_str(),
            job.endpoint,
            status.as_str(),
            to_i64(now),
            to_i64(now.saturating_add(job.completion_window_ms)),
            job.items.len() as i64,
            job.input_file_id,
            job.idempotency_key,
            fingerprint,
            job.metadata
        ],
    )?;
    let mut stmt = tx.prepare(
        "INSERT INTO items (job_id, idx, custom_id, body, state) VALUES (?1, ?2, ?3, ?4, 'queued')",
    )?;
    for (i, item) in job.items.iter().enumerate() {
        stmt.execute(params![id, i as i64, item.custom_id, item.body])?;
    }
    Ok(Created { job: need_job(tx, &id)?, existing: false })
}

fn claim(
    tx: &Transaction<'_>,
    worker: &str,
    max: usize,
    lease_ms: u64,
    now: UnixMs,
    limits: &Limits,
) -> Result<Vec<Lease>, StoreError> {
    check_lease(lease_ms, limits)?;
    let max = max.min(limits.max_claim);
    let picked: Vec<(String, i64, String)> = {
        let mut stmt = tx.prepare(
            "SELECT i.job_id, i.idx, j.endpoint FROM items i JOIN jobs j ON j.id = i.job_id
             WHERE j.status = 'in_progress'
               AND (i.state = 'queued'
                    OR (i.state = 'leased' AND i.lease_expires_at <= ?1 AND i.attempts < ?2))
             ORDER BY j.created_at, j.rowid, i.idx
             LIMIT ?3",
        )?;
        let rows = stmt.query_map(params![to_i64(now), limits.max_attempts, max as i64], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })?;
        rows.collect::<Result<_, _>>()?
    };
    let expires_at = now.saturating_add(lease_ms);
    let mut leases = Vec::with_capacity(picked.len());
    let mut stmt = tx.prepare(
        "UPDATE items SET state = 'leased', worker = ?3, fence = fence + 1,
                          attempts = attempts + 1, lease_expires_at = ?4
         WHERE job_id = ?1 AND idx = ?2
         RETURNING custom_id, body, fence, attempts",
    )?;
    for (job_id, idx, endpoint) in picked {
        let (custom_id, body, fence, attempts): (String, String, i64, i64) = stmt
            .query_row(params![job_id, idx, worker, to_i64(expires_at)], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })?;
        leases.push(Lease {
            job_id,
            item: to_u64(idx),
            custom_id,
            body,
            endpoint,
            worker: worker.to_owned(),
            fence: to_u64(fence),
            expires_at,
            attempt: u32::try_from(attempts).unwrap_or(u32::MAX),
        });
    }
    Ok(leases)
}

fn complete(
    tx: &Transaction<'_>,
    lease: &Lease,
    outcome: &Outcome,
    now: UnixMs,
    limits: &Limits,
) -> Result<Completion, StoreError> {
    let job = need_job(tx, &lease.job_id)?;
    let key = params![lease.job_id, to_i64(lease.item), to_i64(lease.fence)];
    let state: Option<String> = tx
        .query_row(
            "SELECT state FROM items WHERE job_id = ?1 AND idx = ?2 AND fence = ?3
               AND state IN ('leased', 'aborting')",
            key,
            |r| r.get(0),
        )
        .optional()?;
    let Some(state) = state else {
        return Err(StoreError::StaleLease {
            job_id: lease.job_id.clone(),
            item: lease.item,
            fence: lease.fence,
        });
    };
    let written = write_outcome(rule_status(&state), outcome, limits)?;
    let changed = match written.settle {
        Settle::Requeue => tx.execute(
            "UPDATE items SET state = 'queued', worker = NULL, lease_expires_at = NULL
             WHERE job_id = ?1 AND idx = ?2 AND state = 'leased' AND fence = ?3",
            key,
        )?,
        Settle::End(end) => tx.execute(
            "UPDATE items SET state = ?4, worker = NULL, lease_expires_at = NULL,
                              response = ?5, error = ?6, ended_at = ?7
             WHERE job_id = ?1 AND idx = ?2 AND state IN ('leased', 'aborting')
               AND fence = ?3",
            params![
                lease.job_id,
                to_i64(lease.item),
                to_i64(lease.fence),
                end.as_str(),
                written.response,
                written.error,
                to_i64(now)
            ],
        )?,
    };
    if changed == 0 {
        return Err(StoreError::StaleLease {
            job_id: lease.job_id.clone(),
            item: lease.item,
            fence: lease.fence,
        });
    }
    let job = match written.settle {
        Settle::End(end) => {
            add_counts(tx, &lease.job_id, end, 1)?;
            follow_item_end(tx, &lease.job_id)?
        }
        Settle::Requeue => job,
    };
    Ok(Completion {
        settle: written.settle,
        status: job.status,
        ready_to_finalize: lifecycle::ready_to_finalize(job.status, &job.counts),
    })
}

fn renew(
    tx: &Transaction<'_>,
    lease: &Lease,
    lease_ms: u64,
    now: UnixMs,
    limits: &Limits,
) -> Result<Lease, StoreError> {
    check_lease(lease_ms, limits)?;
    let expires_at = now.saturating_add(lease_ms);
    let changed = tx.execute(
        "UPDATE items SET lease_expires_at = ?4
         WHERE job_id = ?1 AND idx = ?2 AND state = 'leased' AND fence = ?3",
        params![lease.job_id, to_i64(lease.item), to_i64(lease.fence), to_i64(expires_at)],
    )?;
    if changed == 1 {
        return Ok(Lease { expires_at, ..lease.clone() });
    }
    let aborting = tx
        .query_row(
            "SELECT 1 FROM items WHERE job_id = ?1 AND idx = ?2 AND fence = ?3
               AND state = 'aborting'",
            params![lease.job_id, to_i64(lease.item), to_i64(lease.fence)],
            |_| Ok(()),
        )
        .optional()?;
    if aborting.is_some() {
        return Err(StoreError::Cancelling { job_id: lease.job_id.clone(), item: lease.item });
    }
    Err(StoreError::StaleLease {
        job_id: lease.job_id.clone(),
        item: lease.item,
        fence: lease.fence,
    })
}

fn cancel(tx: &Transaction<'_>, job_id: &str, now: UnixMs) -> Result<CancelReport, StoreError> {
    let job = need_job(tx, job_id)?;
    let (next, new) = lifecycle::cancel(job.status)?;
    if new {
        tx.execute(
            "UPDATE jobs SET status = ?2, cancelling_at = ?3 WHERE id = ?1",
            params![job_id, next.as_str(), to_i64(now)],
        )?;
        let n = tx.execute(
            "UPDATE items SET state = 'cancelled', error = ?2, ended_at = ?3
             WHERE job_id = ?1 AND state = 'queued'",
            params![job_id, rule_error(ItemEnd::Cancelled, 0), to_i64(now)],
        )?;
        add_counts(tx, job_id, ItemEnd::Cancelled, n as u64)?;
        tx.execute(
            "UPDATE items SET state = 'aborting' WHERE job_id = ?1 AND state = 'leased'",
            [job_id],
        )?;
    }
    let job = need_job(tx, job_id)?;
    Ok(CancelReport {
        aborts: in_flight(tx, job_id, "aborting")?,
        ready_to_finalize: lifecycle::ready_to_finalize(job.status, &job.counts),
        job,
    })
}

fn tick(tx: &Transaction<'_>, now: UnixMs, limits: &Limits) -> Result<TickReport, StoreError> {
    let mut report = TickReport::default();
    let due: Vec<String> = {
        let mut stmt = tx.prepare(
            "SELECT id FROM jobs WHERE status IN ('validating', 'in_progress') AND expires_at <= ?1
             ORDER BY expires_at, id",
        )?;
        let rows = stmt.query_map([to_i64(now)], |r| r.get(0))?;
        rows.collect::<Result<_, _>>()?
    };
    for id in due {
        let job = need_job(tx, &id)?;
        let created = job.created_at;
        let window = job.expires_at.saturating_sub(created);
        if !lifecycle::is_expired(job.status, created, window, now) {
            continue;
        }
        let status = job.status.become_(BatchStatus::Expired)?;
        report.aborts.extend(in_flight(tx, &id, "leased")?);
        let n = tx.execute(
            "UPDATE items SET state = 'expired', worker = NULL, lease_expires_at = NULL,
                              error = ?2, ended_at = ?3
             WHERE job_id = ?1 AND state IN ('queued', 'leased', 'aborting')",
            params![id, rule_error(ItemEnd::Expired, 0), to_i64(now)],
        )?;
        add_counts(tx, &id, ItemEnd::Expired, n as u64)?;
        write_files(tx, &need_job(tx, &id)?, status, now)?;
        report.expired.push(id);
    }
    let lapsed: Vec<(String, i64, i64, i64, String)> = {
        let mut stmt = tx.prepare(
            "SELECT job_id, idx, fence, attempts, state FROM items
             WHERE state IN ('leased', 'aborting') AND lease_expires_at <= ?1
               AND (state = 'aborting' OR attempts >= ?2)
             ORDER BY job_id, idx",
        )?;
        let rows = stmt.query_map(params![to_i64(now), limits.max_attempts], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })?;
        rows.collect::<Result<_, _>>()?
    };
    for (job_id, idx, fence, attempts, state) in lapsed {
        let attempts = u32::try_from(attempts).unwrap_or(u32::MAX);
        let Lapse::End(end) = lifecycle::lapse(rule_status(&state), attempts, limits.max_attempts)
        else {
            continue;
        };
        tx.execute(
            "UPDATE items SET state = ?4, worker = NULL, lease_expires_at = NULL, error = ?5,
                              ended_at = ?6
             WHERE job_id = ?1 AND idx = ?2 AND state IN ('leased', 'aborting') AND fence = ?3",
            params![job_id, idx, fence, end.as_str(), rule_error(end, attempts), to_i64(now)],
        )?;
        add_counts(tx, &job_id, end, 1)?;
        follow_item_end(tx, &job_id)?;
        report.lapsed += 1;
    }
    let mut stmt = tx.prepare(
        "SELECT id FROM jobs WHERE status IN ('finalizing', 'cancelling')
           AND completed + failed >= total ORDER BY created_at, id",
    )?;
    let rows = stmt.query_map([], |r| r.get(0))?;
    report.ready = rows.collect::<Result<_, _>>()?;
    Ok(report)
}

fn finalize(tx: &Transaction<'_>, job_id: &str, now: UnixMs) -> Result<Job, StoreError> {
    let job = need_job(tx, job_id)?;
    if job.status.is_terminal() {
        return Ok(job);
    }
    if !lifecycle::ready_to_finalize(job.status, &job.counts) {
        return Err(
            lifecycle::IllegalTransition { from: job.status, to: BatchStatus::Completed }.into()
        );
    }
    let status = lifecycle::final_status(job.status)?;
    write_files(tx, &job, status, now)?;
    need_job(tx, job_id)
}

fn due_webhooks(
    tx: &Transaction<'_>,
    max: usize,
    lease_ms: u64,
    now: UnixMs,
) -> Result<Vec<WebhookDelivery>, StoreError> {
    let lease_until = now.saturating_add(lease_ms);
    let mut stmt = tx.prepare(
        "UPDATE webhooks SET attempts = attempts + 1, next_at = ?3
         WHERE id IN (SELECT id FROM webhooks WHERE state = 'pending' AND next_at <= ?1
                      ORDER BY next_at, id LIMIT ?2)
         RETURNING id, job_id, url, body, attempts",
    )?;
    let rows = stmt.query_map(params![to_i64(now), max as i64, to_i64(lease_until)], |r| {
        Ok(WebhookDelivery {
            id: r.get(0)?,
            job_id: r.get(1)?,
            url: r.get(2)?,
            body: r.get(3)?,
            attempt: u32::try_from(r.get::<_, i64>(4)?).unwrap_or(u32::MAX),
            lease_until,
        })
    })?;
    let mut out: Vec<WebhookDelivery> = rows.collect::<Result<_, _>>()?;
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

impl JobStore for SqliteStore {
    async fn put_file(&self, file: NewFile, now: UnixMs) -> Result<FileMeta, StoreError> {
        if file.bytes.len() > self.limits.max_file_bytes {
            let (bytes, max) = (file.bytes.len(), self.limits.max_file_bytes);
            return Err(StoreError::FileTooLarge { bytes, max });
        }
        self.write(move |tx, _| insert_file(tx, &file, now)).await
    }

    async fn file(&self, id: &str) -> Result<Option<(FileMeta, Vec<u8>)>, StoreError> {
        let id = id.to_owned();
        self.read(move |c| {
            let row = c
                .query_row(
                    "SELECT id, tenant, purpose, filename, bytes, created_at, content
                     FROM files WHERE id = ?1",
                    [&id],
                    |r| {
                        let meta = FileMeta {
                            id: r.get(0)?,
                            tenant: r.get(1)?,
                            purpose: r.get(2)?,
                            filename: r.get(3)?,
                            bytes: to_u64(r.get(4)?),
                            created_at: to_u64(r.get(5)?),
                        };
                        Ok((meta, r.get(6)?))
                    },
                )
                .optional()?;
            Ok(row)
        })
        .await
    }

    async fn create_job(&self, job: NewJob, now: UnixMs) -> Result<Created, StoreError> {
        self.write(move |tx, limits| create(tx, job, now, limits)).await
    }

    async fn job(&self, id: &str) -> Result<Option<Job>, StoreError> {
        let id = id.to_owned();
        self.read(move |c| load_job(c, &id)).await
    }

    async fn list_jobs(
        &self,
        tenant: &str,
        kind: JobKind,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Job>, StoreError> {
        let (tenant, after) = (tenant.to_owned(), after.map(str::to_owned));
        self.read(move |c| {
            // Newest first; `after` is the last id of the previous page (its owner's only).
            let cursor = match &after {
                Some(id) => match load_job(c, id)? {
                    Some(j) if j.tenant == tenant => Some((j.created_at as i64, j.id)),
                    _ => return Err(StoreError::NotFound { what: "job", id: id.clone() }),
                },
                None => None,
            };
            let (at, id) = cursor.unwrap_or((i64::MAX, String::new()));
            let sql = format!(
                "SELECT {JOB_COLUMNS} FROM jobs WHERE tenant = ?1 AND kind = ?2
                   AND (created_at < ?3 OR (created_at = ?3 AND id < ?4) OR ?5)
                 ORDER BY created_at DESC, id DESC LIMIT ?6"
            );
            let mut stmt = c.prepare(&sql)?;
            let rows = stmt.query_map(
                rusqlite::params![tenant, kind.as_str(), at, id, after.is_none(), limit as i64],
                job_from_row,
            )?;
            rows.map(|r| r?).collect()
        })
        .await
    }

    async fn claim(
        &self,
        worker: &str,
        max: usize,
        lease_ms: u64,
        now: UnixMs,
    ) -> Result<Vec<Lease>, StoreError> {
        let worker = worker.to_owned();
        self.write(move |tx, limits| claim(tx, &worker, max, lease_ms, now, limits)).await
    }

    async fn renew(&self, lease: &Lease, lease_ms: u64, now: UnixMs) -> Result<Lease, StoreError> {
        let lease = lease.clone();
        self.write(move |tx, limits| renew(tx, &lease, lease_ms, now, limits)).await
    }

    async fn complete(
        &self,
        lease: &Lease,
        outcome: Outcome,
        now: UnixMs,
    ) -> Result<Completion, StoreError> {
        let lease = lease.clone();
        self.write(move |tx, limits| complete(tx, &lease, &outcome, now, limits)).await
    }

    async fn cancel(&self, job_id: &str, now: UnixMs) -> Result<CancelReport, StoreError> {
        let job_id = job_id.to_owned();
        self.write(move |tx, _| cancel(tx, &job_id, now)).await
    }

    async fn tick(&self, now: UnixMs) -> Result<TickReport, StoreError> {
        self.write(move |tx, limits| tick(tx, now, limits)).await
    }

    async fn finalize(&self, job_id: &str, now: UnixMs) -> Result<Job, StoreError> {
        let job_id = job_id.to_owned();
        self.write(move |tx, _| finalize(tx, &job_id, now)).await
    }

    async fn enqueue_webhook(&self, hook: NewWebhook, now: UnixMs) -> Result<bool, StoreError> {
        let max = self.limits.max_webhook_body_bytes;
        if hook.body.len() > max {
            return Err(StoreError::WebhookTooLarge { bytes: hook.body.len(), max });
        }
        self.write(move |tx, _| {
            let n = tx.execute(
                "INSERT INTO webhooks (id, job_id, url, body, state, next_at, created_at)
                 VALUES (?1, ?2, ?3, ?4, 'pending', ?5, ?5) ON CONFLICT (id) DO NOTHING",
                params![hook.id, hook.job_id, hook.url, hook.body, to_i64(now)],
            )?;
            Ok(n == 1)
        })
        .await
    }

    async fn due_webhooks(
        &self,
        max: usize,
        lease_ms: u64,
        now: UnixMs,
    ) -> Result<Vec<WebhookDelivery>, StoreError> {
        self.write(move |tx, limits| {
            check_lease(lease_ms, limits)?;
            due_webhooks(tx, max.min(limits.max_claim), lease_ms, now)
        })
        .await
    }

    async fn record_webhook(
        &self,
        delivery: &WebhookDelivery,
        next: Next,
        now: UnixMs,
    ) -> Result<(), StoreError> {
        let (id, attempt) = (delivery.id.clone(), delivery.attempt);
        self.write(move |tx, _| {
            let (state, next_at) = webhook_columns(next);
            let finished_at = next_at.is_none().then_some(to_i64(now));
            let n = tx.execute(
                "UPDATE webhooks SET state = ?3, next_at = coalesce(?4, next_at),
                                     finished_at = ?5, recorded = attempts
                 WHERE id = ?1 AND attempts = ?2 AND recorded < attempts AND state = 'pending'",
                params![id, attempt, state, next_at.map(to_i64), finished_at],
            )?;
            if n == 0 {
                return Err(StoreError::StaleDelivery { id, attempt });
            }
            Ok(())
        })
        .await
    }

    async fn webhook(&self, id: &str) -> Result<Option<WebhookState>, StoreError> {
        let id = id.to_owned();
        self.read(move |c| {
            let row: Option<(String, i64, i64)> = c
                .query_row(
                    "SELECT state, attempts, next_at FROM webhooks WHERE id = ?1",
                    [&id],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()?;
            row.map(|(state, attempts, next_at)| {
                let attempts = u32::try_from(attempts).unwrap_or(u32::MAX);
                WebhookState::from_columns(&state, attempts, to_u64(next_at))
            })
            .transpose()
        })
        .await
    }
}
