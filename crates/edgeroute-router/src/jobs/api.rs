//! The async routes, in OpenAI's shapes so its clients work unchanged:
//!
//! | route | who may call |
//! |---|---|
//! | `POST /v1/files` (multipart: `file`, `purpose=batch`) | a tenant token with `inference` |
//! | `GET /v1/files/{id}`, `GET /v1/files/{id}/content` | the file's tenant |
//! | `POST /v1/batches` (`Idempotency-Key`, `x-edgeroute-webhook`) | a tenant token with `inference`, naming its own input file |
//! | `GET /v1/batches`, `GET /v1/batches/{id}`, `POST /v1/batches/{id}/cancel` | the batch's tenant |
//! | `POST /v1/chat/completions` with `Prefer: respond-async` → `202` | a tenant token with `inference` |
//! | `GET /v1/async/{id}` | the request's tenant |
//!
//! Another tenant's id answers 404, the same as an id that does not exist: ids are not a way
//! to learn what others run.

use std::sync::Arc;

use axum::extract::{Multipart, Path, Query, Request, State};
use axum::response::{IntoResponse, Response};
use edgeroute_auth::Scope;
use edgeroute_http::ApiError;
use edgeroute_jobs::{
    BatchStatus, FileMeta, Job, JobKind, JobStore, NewFile, NewItem, NewJob, StoreError,
};
use http::{HeaderMap, StatusCode, header};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{JobMeta, Jobs, now_ms};
use crate::{Authed, Shared, verify};

/// The header naming where a job's end is reported (checked against the allow-list).
pub const WEBHOOK_HEADER: &str = "x-edgeroute-webhook";

fn jobs_of(sh: &Shared) -> Result<&Arc<Jobs>, Response> {
    sh.jobs.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            Some("jobs_disabled"),
            "async jobs (files, batches, async requests) are not enabled on this router: its operator has no [jobs] section",
        )
        .into_response()
    })
}

/// The caller's tenant and what its token says (residency, claims), or the refusal.
/// The jobs of this router and the caller's tenant, or the refusal.
fn caller<'a>(sh: &'a Shared, headers: &HeaderMap) -> Result<(&'a Arc<Jobs>, String), Response> {
    let jobs = jobs_of(sh)?;
    Ok((jobs, tenant(sh, headers)?.0))
}

fn tenant(sh: &Shared, req_headers: &HeaderMap) -> Result<(String, JobMeta), Response> {
    match verify(sh, req_headers, Scope::Inference)? {
        None => Ok(("anonymous".into(), JobMeta::default())),
        Some(Authed { caller, verified }) => {
            let r = verified.residency.as_deref();
            let meta = JobMeta {
                jurisdictions: r.and_then(|r| r.jurisdictions.clone()),
                regions: r.and_then(|r| r.regions.clone()),
                claims: verified.attrs.as_deref().cloned(),
                ..JobMeta::default()
            };
            Ok((caller.tenant, meta))
        }
    }
}

pub fn store_error(e: StoreError) -> Response {
    let (status, kind, code) = match &e {
        StoreError::NotFound { .. } => {
            (StatusCode::NOT_FOUND, "invalid_request_error", "not_found")
        }
        StoreError::FileTooLarge { .. } => {
            (StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", "file_too_large")
        }
        StoreError::ItemCount { .. } => {
            (StatusCode::BAD_REQUEST, "invalid_request_error", "too_many_requests_in_file")
        }
        StoreError::Illegal(_) => (StatusCode::CONFLICT, "invalid_request_error", "invalid_state"),
        StoreError::IdempotencyConflict { .. } => {
            (StatusCode::CONFLICT, "invalid_request_error", "idempotency_key_reused")
        }
        e if e.is_retryable() => {
            return ApiError::unavailable(
                "jobs_store_unavailable",
                format!("the job store is unavailable ({e}); retry in a few seconds"),
                2,
            )
            .into_response();
        }
        _ => {
            tracing::error!(error = %e, "job store");
            return ApiError::internal("the job store failed; the operator's logs say why")
                .into_response();
        }
    };
    ApiError::new(status, kind, Some(code), e.to_string()).into_response()
}

fn not_found(what: &str, id: &str) -> Response {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        Some("not_found"),
        format!("no {what} {id:?}"),
    )
    .into_response()
}

fn file_object(f: &FileMeta) -> Value {
    json!({
        "id": f.id,
        "object": "file",
        "bytes": f.bytes,
        "created_at": f.created_at / 1000,
        "filename": f.filename,
        "purpose": f.purpose,
        "status": "processed",
        "expires_at": null,
        "status_details": null,
    })
}

/// A batch in OpenAI's shape; times in seconds.
pub fn batch_object(job: &Job) -> Value {
    let meta = JobMeta::parse(job);
    let s = |ms: u64| Value::from(ms / 1000);
    let at = |status: BatchStatus| match job.finished_at {
        Some(t) if job.status == status => s(t),
        _ => Value::Null,
    };
    let finalizing = match job.status {
        BatchStatus::Finalizing => Value::from(now_ms() / 1000),
        BatchStatus::Completed => job.finished_at.map_or(Value::Null, s),
        _ => Value::Null,
    };
    json!({
        "id": job.id,
        "object": "batch",
        "endpoint": job.endpoint,
        "errors": null,
        "input_file_id": job.input_file_id,
        "completion_window": meta.completion_window,
        "status": job.status.as_str(),
        "output_file_id": job.output_file_id,
        "error_file_id": job.error_file_id,
        "created_at": s(job.created_at),
        "in_progress_at": s(job.created_at),
        "expires_at": s(job.expires_at),
        "finalizing_at": finalizing,
        "completed_at": at(BatchStatus::Completed),
        "failed_at": at(BatchStatus::Failed),
        "expired_at": at(BatchStatus::Expired),
        "cancelling_at": job.cancelling_at.map_or(Value::Null, s),
        "cancelled_at": at(BatchStatus::Cancelled),
        "request_counts": {
            "total": job.counts.total,
            "completed": job.counts.completed,
            "failed": job.counts.failed,
        },
        "metadata": meta.metadata.map_or(Value::Null, Value::Object),
    })
}

fn json_response(status: StatusCode, v: &Value) -> Response {
    (status, axum::Json(v)).into_response()
}

/// The caller's job of `kind`, or 404 (also for another tenant's).
async fn own_job(jobs: &Jobs, tenant: &str, id: &str, kind: JobKind) -> Result<Job, Response> {
    match jobs.store.job(id).await {
        Ok(Some(j)) if j.tenant == tenant && j.kind == kind => Ok(j),
        Ok(_) => Err(not_found(if kind == JobKind::Batch { "batch" } else { "async request" }, id)),
        Err(e) => Err(store_error(e)),
    }
}

pub(crate) async fn upload_file(State(sh): State<Arc<Shared>>, req: Request) -> Response {
    let jobs = match jobs_of(&sh) {
        Ok(j) => j,
        Err(r) => return r,
    };
    let (tenant, _) = match tenant(&sh, req.headers()) {
        Ok(t) => t,
        Err(r) => return r,
    };
    let mut multipart = match <Multipart as axum::extract::FromRequest<()>>::from_request(req, &())
        .await
    {
        Ok(m) => m,
        Err(e) => {
            return ApiError::invalid_request(None, format!("expected multipart/form-data: {e}"))
                .into_response();
        }
    };
    let max = jobs.store.limits().max_file_bytes;
    let (mut purpose, mut file) = (None, None);
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                return ApiError::invalid_request(None, format!("multipart body: {e}"))
                    .into_response();
            }
        };
        let name = field.name().map(str::to_owned);
        match name.as_deref() {
            Some("purpose") => purpose = field.text().await.ok(),
            Some("file") => {
                let name = field.file_name().unwrap_or("upload.jsonl").to_owned();
                let mut field = field;
                let mut bytes = Vec::new();
                loop {
                    match field.chunk().await {
                        Ok(Some(c)) => {
                            if bytes.len() + c.len() > max {
                                return ApiError::payload_too_large(max).into_response();
                            }
                            bytes.extend_from_slice(&c);
                        }
                        Ok(None) => break,
                        Err(e) => {
                            return ApiError::invalid_request(Some("file"), format!("file: {e}"))
                                .into_response();
                        }
                    }
                }
                file = Some((name, bytes));
            }
            _ => {}
        }
    }
    let Some((filename, bytes)) = file else {
        return ApiError::invalid_request(Some("file"), "a `file` field is required")
            .into_response();
    };
    match purpose.as_deref() {
        Some("batch") => {}
        other => {
            return ApiError::invalid_request(
                Some("purpose"),
                format!("purpose {other:?}: this router stores files for `batch` only"),
            )
            .into_response();
        }
    }
    // Checked now, so a bad line is named at upload rather than at batch creation.
    let limits = jobs.store.limits();
    if let Err(e) = edgeroute_jobs::input::parse(&bytes, "/v1/chat/completions", limits) {
        return ApiError::invalid_request(Some("file"), format!("batch input: {e}"))
            .into_response();
    }
    let file = NewFile { tenant, purpose: "batch".into(), filename, bytes };
    match jobs.store.put_file(file, now_ms()).await {
        Ok(meta) => json_response(StatusCode::OK, &file_object(&meta)),
        Err(e) => store_error(e),
    }
}

async fn own_file(
    sh: &Shared,
    headers: &HeaderMap,
    id: &str,
) -> Result<(FileMeta, Vec<u8>), Response> {
    let jobs = jobs_of(sh)?;
    let (tenant, _) = tenant(sh, headers)?;
    match jobs.store.file(id).await {
        Ok(Some((m, b))) if m.tenant == tenant => Ok((m, b)),
        Ok(_) => Err(not_found("file", id)),
        Err(e) => Err(store_error(e)),
    }
}

pub(crate) async fn get_file(
    State(sh): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    match own_file(&sh, &headers, &id).await {
        Ok((m, _)) => json_response(StatusCode::OK, &file_object(&m)),
        Err(r) => r,
    }
}

pub(crate) async fn file_content(
    State(sh): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    match own_file(&sh, &headers, &id).await {
        Ok((_, bytes)) => ([(header::CONTENT_TYPE, "application/jsonl")], bytes).into_response(),
        Err(r) => r,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBatch {
    input_file_id: String,
    endpoint: String,
    completion_window: String,
    #[serde(default)]
    metadata: Option<serde_json::Map<String, Value>>,
}

/// `24h`, `90m`, `3600s` → ms, within `max_s`.
fn window_ms(text: &str, max_s: u64) -> Option<u64> {
    let (n, unit) = text.split_at(text.len().checked_sub(1)?);
    let n: u64 = n.parse().ok()?;
    let s = n.checked_mul(match unit {
        "h" => 3600,
        "m" => 60,
        "s" => 1,
        _ => return None,
    })?;
    (1..=max_s).contains(&s).then_some(s * 1000)
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, Response> {
    match headers.get("idempotency-key") {
        None => Ok(None),
        Some(v) => match v.to_str() {
            Ok(k) if !k.is_empty() && k.len() <= 255 => Ok(Some(k.to_owned())),
            _ => Err(ApiError::invalid_request(
                None,
                "`Idempotency-Key` is 1 to 255 visible ASCII characters",
            )
            .with_code("invalid_header")
            .into_response()),
        },
    }
}

fn webhook_target(jobs: &Jobs, headers: &HeaderMap) -> Result<Option<String>, Response> {
    let Some(v) = headers.get(WEBHOOK_HEADER) else { return Ok(None) };
    let url = v.to_str().unwrap_or("");
    match edgeroute_jobs::webhook::target::check_url(&jobs.targets, url) {
        Ok(_) => Ok(Some(url.to_owned())),
        Err(e) => Err(ApiError::invalid_request(None, format!("`{WEBHOOK_HEADER}`: {e}"))
            .with_code("webhook_target_refused")
            .into_response()),
    }
}

/// What a submit (a batch, an async request) takes from its headers.
struct Submit<'a> {
    jobs: &'a Arc<Jobs>,
    tenant: String,
    meta: JobMeta,
    key: Option<String>,
    webhook: Option<String>,
}

fn submit<'a>(sh: &'a Shared, headers: &HeaderMap) -> Result<Submit<'a>, Response> {
    let jobs = jobs_of(sh)?;
    let (tenant, meta) = tenant(sh, headers)?;
    let key = idempotency_key(headers)?;
    let webhook = webhook_target(jobs, headers)?;
    Ok(Submit { jobs, tenant, meta, key, webhook })
}

pub(crate) async fn create_batch(State(sh): State<Arc<Shared>>, req: Request) -> Response {
    let Submit { jobs, tenant, mut meta, key, webhook } = match submit(&sh, req.headers()) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let body: CreateBatch = match edgeroute_http::json::read_json(req.into_body(), 64 * 1024).await
    {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    if body.endpoint != "/v1/chat/completions" {
        return ApiError::invalid_request(
            Some("endpoint"),
            format!("endpoint {:?}: this router batches `/v1/chat/completions`", body.endpoint),
        )
        .into_response();
    }
    let Some(window) = window_ms(&body.completion_window, jobs.cfg.max_completion_window_s) else {
        return ApiError::invalid_request(
            Some("completion_window"),
            format!(
                "completion_window {:?}: a duration like `24h`, at most {} s",
                body.completion_window, jobs.cfg.max_completion_window_s
            ),
        )
        .into_response();
    };
    if body.metadata.as_ref().is_some_and(|m| m.len() > 16 || m.values().any(|v| !v.is_string())) {
        return ApiError::invalid_request(Some("metadata"), "metadata: at most 16 string values")
            .into_response();
    }
    let (_, bytes) = match jobs.store.file(&body.input_file_id).await {
        Ok(Some((m, b))) if m.tenant == tenant && m.purpose == "batch" => (m, b),
        Ok(_) => return not_found("file", &body.input_file_id),
        Err(e) => return store_error(e),
    };
    let items: Vec<NewItem> =
        match edgeroute_jobs::input::parse(&bytes, &body.endpoint, jobs.store.limits()) {
            Ok(i) => i,
            Err(e) => {
                return ApiError::invalid_request(
                    Some("input_file_id"),
                    format!("batch input: {e}"),
                )
                .into_response();
            }
        };
    meta.metadata = body.metadata;
    meta.completion_window = body.completion_window;
    meta.webhook = webhook;
    let job = NewJob {
        tenant,
        kind: JobKind::Batch,
        endpoint: body.endpoint,
        completion_window_ms: window,
        input_file_id: Some(body.input_file_id),
        idempotency_key: key,
        metadata: serde_json::to_string(&meta).ok(),
        items,
    };
    match jobs.store.create_job(job, now_ms()).await {
        Ok(c) => {
            if !c.existing {
                jobs.wake().await;
            }
            json_response(StatusCode::OK, &batch_object(&c.job))
        }
        Err(e) => store_error(e),
    }
}

pub(crate) async fn get_batch(
    State(sh): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let (jobs, tenant) = match caller(&sh, &headers) {
        Ok(c) => c,
        Err(r) => return r,
    };
    match own_job(jobs, &tenant, &id, JobKind::Batch).await {
        Ok(job) => json_response(StatusCode::OK, &batch_object(&job)),
        Err(r) => r,
    }
}

#[derive(Deserialize)]
pub struct ListQuery {
    after: Option<String>,
    limit: Option<usize>,
}

pub(crate) async fn list_batches(
    State(sh): State<Arc<Shared>>,
    Query(q): Query<ListQuery>,
    headers: HeaderMap,
) -> Response {
    let (jobs, tenant) = match caller(&sh, &headers) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let limit = q.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return ApiError::invalid_request(Some("limit"), "limit is 1 to 100").into_response();
    }
    // One more than asked says whether there is more.
    let page =
        match jobs.store.list_jobs(&tenant, JobKind::Batch, q.after.as_deref(), limit + 1).await {
            Ok(p) => p,
            Err(e) => return store_error(e),
        };
    let has_more = page.len() > limit;
    let data: Vec<Value> = page.iter().take(limit).map(batch_object).collect();
    let first = data.first().map(|b| b["id"].clone()).unwrap_or(Value::Null);
    let last = data.last().map(|b| b["id"].clone()).unwrap_or(Value::Null);
    json_response(
        StatusCode::OK,
        &json!({ "object": "list", "data": data, "first_id": first, "last_id": last, "has_more": has_more }),
    )
}

pub(crate) async fn cancel_batch(
    State(sh): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let (jobs, tenant) = match caller(&sh, &headers) {
        Ok(c) => c,
        Err(r) => return r,
    };
    if let Err(r) = own_job(jobs, &tenant, &id, JobKind::Batch).await {
        return r;
    }
    cancel(jobs, &id).await
}

/// `cancelling` is persisted, then the in-flight items are aborted.
async fn cancel(jobs: &Jobs, id: &str) -> Response {
    let report = match jobs.store.cancel(id, now_ms()).await {
        Ok(r) => r,
        Err(e) => return store_error(e),
    };
    jobs.abort(&report.aborts).await;
    let job = if report.ready_to_finalize {
        jobs.finalize(id).await.unwrap_or(report.job)
    } else {
        report.job
    };
    json_response(StatusCode::OK, &batch_object(&job))
}

/// Whether the caller asked for an async answer (`Prefer: respond-async`, RFC 7240).
pub fn wants_async(headers: &HeaderMap) -> bool {
    headers.get_all("prefer").iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.split(',').any(|p| p.trim().eq_ignore_ascii_case("respond-async")))
    })
}

fn async_object(job: &Job, result: Option<Value>) -> Value {
    let status = match job.status {
        BatchStatus::Completed if job.counts.completed == 1 => "completed",
        BatchStatus::Completed => "failed",
        BatchStatus::InProgress | BatchStatus::Validating | BatchStatus::Finalizing => {
            "in_progress"
        }
        other => other.as_str(),
    };
    let mut v = json!({
        "id": job.id,
        "object": "async_request",
        "endpoint": job.endpoint,
        "status": status,
        "created_at": job.created_at / 1000,
        "expires_at": job.expires_at / 1000,
        "completed_at": job.finished_at.map(|t| t / 1000),
    });
    if let Some(r) = result {
        v["response"] = r["response"].clone();
        v["error"] = r["error"].clone();
    }
    v
}

/// `POST /v1/chat/completions` with `Prefer: respond-async`: stored (durable on return), `202`
/// with the request's id and where to poll.
pub(crate) async fn submit_async(sh: Arc<Shared>, req: Request) -> Response {
    let Submit { jobs, tenant, mut meta, key, webhook } = match submit(&sh, req.headers()) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let max = sh.cfg.limits.max_body_bytes.min(jobs.store.limits().max_line_bytes);
    let body: serde_json::Map<String, Value> =
        match edgeroute_http::json::read_json(req.into_body(), max).await {
            Ok(b) => b,
            Err(e) => return e.into_response(),
        };
    if !body.get("model").is_some_and(Value::is_string) {
        return ApiError::invalid_request(Some("model"), "`model` is required").into_response();
    }
    if body.get("stream").and_then(Value::as_bool) == Some(true) {
        return ApiError::invalid_request(
            Some("stream"),
            "`stream: true` with `Prefer: respond-async`: an async answer is stored whole; poll it or take the webhook",
        )
        .into_response();
    }
    meta.completion_window = format!("{}s", jobs.cfg.max_completion_window_s);
    meta.webhook = webhook;
    let job = NewJob {
        tenant,
        kind: JobKind::Single,
        endpoint: "/v1/chat/completions".into(),
        completion_window_ms: jobs.cfg.max_completion_window_s * 1000,
        input_file_id: None,
        idempotency_key: key,
        metadata: serde_json::to_string(&meta).ok(),
        items: vec![NewItem { custom_id: "request".into(), body: Value::Object(body).to_string() }],
    };
    match jobs.store.create_job(job, now_ms()).await {
        Ok(c) => {
            if !c.existing {
                jobs.wake().await;
            }
            let mut res = json_response(StatusCode::ACCEPTED, &async_object(&c.job, None));
            if let Ok(v) = http::HeaderValue::from_str(&format!("/v1/async/{}", c.job.id)) {
                res.headers_mut().insert(header::LOCATION, v);
            }
            res
        }
        Err(e) => store_error(e),
    }
}

/// `GET /v1/async/{id}`: where it stands; when done, the answer (`response`: status and body)
/// or why it failed (`error`).
pub(crate) async fn get_async(
    State(sh): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let (jobs, tenant) = match caller(&sh, &headers) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let job = match own_job(jobs, &tenant, &id, JobKind::Single).await {
        Ok(j) => j,
        Err(r) => return r,
    };
    let file = job.output_file_id.as_ref().or(job.error_file_id.as_ref());
    let result = match file {
        None => None,
        Some(f) => match jobs.store.file(f).await {
            Ok(Some((_, bytes))) => serde_json::from_slice::<Value>(
                bytes.split(|&b| b == b'\n').next().unwrap_or_default(),
            )
            .ok(),
            Ok(None) => None,
            Err(e) => return store_error(e),
        },
    };
    json_response(StatusCode::OK, &async_object(&job, result))
}

/// `POST /v1/async/{id}/cancel`.
pub(crate) async fn cancel_async(
    State(sh): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let (jobs, tenant) = match caller(&sh, &headers) {
        Ok(c) => c,
        Err(r) => return r,
    };
    if let Err(r) = own_job(jobs, &tenant, &id, JobKind::Single).await {
        return r;
    }
    let res = cancel(jobs, &id).await;
    if res.status() != StatusCode::OK {
        return res;
    }
    match jobs.store.job(&id).await {
        Ok(Some(job)) => json_response(StatusCode::OK, &async_object(&job, None)),
        Ok(None) => not_found("async request", &id),
        Err(e) => store_error(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completion_windows_are_durations_within_the_bound() {
        assert_eq!(window_ms("24h", 86_400), Some(86_400_000));
        assert_eq!(window_ms("90m", 86_400), Some(5_400_000));
        assert_eq!(window_ms("5s", 86_400), Some(5_000));
        assert_eq!(window_ms("25h", 86_400), None);
        assert_eq!(window_ms("0h", 86_400), None);
        assert_eq!(window_ms("h", 86_400), None);
        assert_eq!(window_ms("", 86_400), None);
        assert_eq!(window_ms("1d", 86_400), None);
    }

    #[test]
    fn prefer_respond_async_is_found_among_preferences() {
        let mut h = HeaderMap::new();
        assert!(!wants_async(&h));
        h.insert(
            "prefer",
            "return=minimal, Respond-Async".parse().unwrap_or_else(|_| unreachable!()),
        );
        assert!(wants_async(&h));
    }
}
