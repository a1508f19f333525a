//! A client for the Hugging Face hub's HTTP protocol, written to distrust the server.
//!
//! Two requests matter: `GET {endpoint}/api/models/{id}/revision/{rev}?blobs=true` lists a
//! repository at a commit (with sizes and, for LFS files, SHA-256s), and
//! `GET {endpoint}/{id}/resolve/{commit}/{path}` downloads one file, usually through a
//! redirect to a CDN. Redirects are followed by hand so that each target is checked: its
//! scheme (https; http only to loopback) and its host (the endpoint's, or one listed in
//! `allowed_hosts`). The token goes to the endpoint's host only.
//!
//! Downloads write into a caller-chosen partial file and resume from its length with
//! `Range: bytes=N-`; a `200` answer to a ranged request restarts from zero. Size is enforced
//! while streaming (a server cannot fill the disk past the announced size) and the SHA-256 is
//! checked at the end; a mismatch deletes the partial file.
//!
//! This module does not decide where files go or install anything: see `install`.

use std::io::SeekFrom;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{
    AUTHORIZATION, CONTENT_LENGTH, CONTENT_RANGE, HeaderMap, HeaderValue, LOCATION, RANGE,
    USER_AGENT,
};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};

use crate::config::HubConfig;
use crate::error::{HubError, shown};
use crate::filter::FileFilter;
use crate::manifest::{FileEntry, Manifest};
use crate::model_ref::{Commit, HubId, HubModel};

const USER_AGENT_VALUE: &str = concat!("edgeroute-hub/", env!("CARGO_PKG_VERSION"));
/// Write buffer for downloads: large enough that a 16 KiB network frame is not a syscall.
const WRITE_BUFFER: usize = 1 << 20;
/// Longest single wait between retries, whatever the doubling says.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

type Http = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// The hub client. Cheap to clone (one shared connection pool).
#[derive(Clone)]
pub struct HubClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for HubClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubClient").field("endpoint", &self.inner.base).finish_non_exhaustive()
    }
}

struct Inner {
    http: Http,
    /// The endpoint without a trailing `/`.
    base: String,
    endpoint: Origin,
    /// True only when the endpoint itself is plain http on loopback (tests): then, and only
    /// then, http redirect targets on loopback are allowed too.
    plain_http: bool,
    allowed: Vec<HostRule>,
    token: Option<HeaderValue>,
    connect_timeout: Duration,
    read_timeout: Duration,
    max_redirects: u32,
    max_file_bytes: u64,
    max_metadata_bytes: usize,
    retries: u32,
    retry_backoff: Duration,
}

/// Where a request goes, for the allow-list: lowercase host and effective port.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Origin {
    host: String,
    port: u16,
}

impl Origin {
    fn of(uri: &Uri) -> Result<(Self, Scheme), HubError> {
        let authority = uri
            .authority()
            .ok_or_else(|| HubError::BadResponse { what: "a URL without a host".into() })?;
        if authority.as_str().contains('@') {
            return Err(HubError::BadResponse { what: "a URL with embedded credentials".into() });
        }
        let host = authority.host().to_ascii_lowercase();
        let scheme = match uri.scheme_str() {
            Some("https") => Scheme::Https,
            Some("http") => Scheme::Http,
            other => {
                return Err(HubError::InsecureScheme {
                    scheme: shown(other.unwrap_or("")),
                    host: shown(&host),
                });
            }
        };
        let port = authority.port_u16().unwrap_or(scheme.default_port());
        Ok((Origin { host, port }, scheme))
    }

    fn shown(&self, scheme: Scheme) -> String {
        if self.port == scheme.default_port() {
            shown(&self.host)
        } else {
            shown(&format!("{}:{}", self.host, self.port))
        }
    }

    fn is_loopback(&self) -> bool {
        let bare = self.host.trim_start_matches('[').trim_end_matches(']');
        bare == "localhost" || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scheme {
    Http,
    Https,
}

impl Scheme {
    fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }
}

/// An `allowed_hosts` entry: `host` (default port of the scheme) or `host:port`.
#[derive(Debug, Clone)]
struct HostRule {
    host: String,
    port: Option<u16>,
}

impl HostRule {
    fn parse(entry: &str) -> Result<Self, HubError> {
        let bad = |why: &str| HubError::Config {
            reason: format!("allowed_hosts entry {:?}: {why}", shown(entry)),
        };
        let ok_chars = entry
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'));
        if entry.is_empty() || !ok_chars {
            return Err(bad("give a bare host or host:port (no scheme, path or wildcard)"));
        }
        let authority: http::uri::Authority =
            entry.parse().map_err(|_| bad("not a valid host or host:port"))?;
        Ok(HostRule { host: authority.host().to_ascii_lowercase(), port: authority.port_u16() })
    }

    fn matches(&self, origin: &Origin, scheme: Scheme) -> bool {
        self.host == origin.host && self.port.unwrap_or(scheme.default_port()) == origin.port
    }
}

/// One file to download: where from, for which model, and where to.
#[derive(Clone, Copy)]
struct Job<'a> {
    uri: &'a Uri,
    id: &'a HubId,
    commit: &'a Commit,
    file: &'a FileEntry,
    partial: &'a Path,
}

/// What every response to a download request must agree with, if it says anything.
struct Expect<'a> {
    commit: &'a Commit,
    size: u64,
    path: &'a str,
}

impl HubClient {
    /// Builds a client; fails on an unusable configuration (scheme, host list, token).
    pub fn new(config: HubConfig) -> Result<Self, HubError> {
        let base = config.endpoint.trim_end_matches('/').to_owned();
        let uri: Uri = base.parse().map_err(|_| HubError::Config {
            reason: format!("endpoint {:?} is not a URL", shown(&config.endpoint)),
        })?;
        if uri.query().is_some() {
            return Err(HubError::Config { reason: "the endpoint must not have a query".into() });
        }
        let (endpoint, scheme) = Origin::of(&uri).map_err(|e| HubError::Config {
            reason: format!("endpoint {:?}: {e}", shown(&config.endpoint)),
        })?;
        if scheme == Scheme::Http && !endpoint.is_loopback() {
            return Err(HubError::Config {
                reason: format!(
                    "endpoint {:?} uses plain http; only https is allowed (http only to loopback)",
                    shown(&config.endpoint)
                ),
            });
        }
        let allowed =
            config.allowed_hosts.iter().map(|h| HostRule::parse(h)).collect::<Result<_, _>>()?;
        let token = match &config.token {
            Some(t) if !t.is_empty() => {
                let mut v = HeaderValue::from_str(&format!("Bearer {t}")).map_err(|_| {
                    HubError::Config { reason: "the hub token contains invalid characters".into() }
                })?;
                v.set_sensitive(true);
                Some(v)
            }
            _ => None,
        };
        if config.max_redirects > 20 {
            return Err(HubError::Config { reason: "max_redirects above 20".into() });
        }

        let connect_timeout = Duration::from_millis(config.connect_timeout_ms);
        // The TLS layer decides the scheme; policy on http is enforced before each request.
        let tls = edgeroute_http::client::tls_config(None)
            .map_err(|reason| HubError::Config { reason })?;
        let opts = edgeroute_http::client::ClientOptions {
            connect_timeout,
            pool_idle_timeout: Duration::from_secs(60),
            pool_max_idle_per_host: 4,
        };
        let http = edgeroute_http::client::https_client(&opts, tls);

        Ok(HubClient {
            inner: Arc::new(Inner {
                http,
                base,
                endpoint,
                plain_http: scheme == Scheme::Http,
                allowed,
                token,
                connect_timeout,
                read_timeout: Duration::from_millis(config.read_timeout_ms),
                max_redirects: config.max_redirects,
                max_file_bytes: config.max_file_bytes,
                max_metadata_bytes: config.max_metadata_bytes,
                retries: config.retries,
                retry_backoff: Duration::from_millis(config.retry_backoff_ms),
            }),
        })
    }

    /// Resolves a revision to a commit and lists the files `filter` selects, every value
    /// validated (see [`Manifest`]). Retries transient failures.
    pub async fn resolve(
        &self,
        model: &HubModel,
        filter: &FileFilter,
    ) -> Result<Manifest, HubError> {
        let url = format!(
            "{}/api/models/{}/revision/{}?blobs=true",
            self.inner.base,
            model.id,
            model.revision.url_segment()
        );
        let uri = parse_uri(&url)?;
        let mut attempt = 0;
        loop {
            match self.resolve_once(&uri, model, filter).await {
                Err(e) if e.is_retryable() && attempt < self.inner.retries => {
                    tracing::warn!(model = %model.id, attempt, error = %e, "hub info request failed; retrying");
                    self.backoff(attempt).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn resolve_once(
        &self,
        uri: &Uri,
        model: &HubModel,
        filter: &FileFilter,
    ) -> Result<Manifest, HubError> {
        let (resp, host) = self.send_following(uri.clone(), None, None).await?;
        let status = resp.status();
        if status != StatusCode::OK {
            return Err(status_error(
                status,
                &model.id,
                &model.revision.to_string(),
                "the repository info request",
            ));
        }
        let body = self.read_limited(resp.into_body(), &host).await?;
        Manifest::from_repo_info(
            &model.id,
            &model.revision,
            &body,
            filter,
            self.inner.max_file_bytes,
        )
    }

    /// Downloads one file of `id` at `commit` into `partial`, resuming from its current length,
    /// retrying transient failures, and verifying size and (when announced) SHA-256. On
    /// success `partial` holds the whole file, flushed to disk. `progress` receives the bytes
    /// of this file present so far (it may go back to zero if the hub restarts the transfer).
    pub async fn download(
        &self,
        id: &HubId,
        commit: &Commit,
        file: &FileEntry,
        partial: &Path,
        progress: &mut (dyn FnMut(u64) + Send),
    ) -> Result<(), HubError> {
        if file.size > self.inner.max_file_bytes {
            return Err(HubError::FileTooLarge {
                path: file.path.to_string(),
                size: file.size,
                max: self.inner.max_file_bytes,
            });
        }
        if let Some(parent) = partial.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| HubError::io("creating directory", parent, e))?;
        }
        let uri = parse_uri(&format!("{}/{id}/resolve/{commit}/{}", self.inner.base, file.path))?;
        // Hash state carried across attempts so a resume does not re-read the partial file.
        let mut carried: Option<(Option<Sha256>, u64)> = None;
        let mut attempt = 0;
        loop {
            let job = Job { uri: &uri, id, commit, file, partial };
            let result = self.download_once(&job, &mut carried, progress).await;
            match result {
                Err(e) if e.is_retryable() && attempt < self.inner.retries => {
                    tracing::warn!(model = %id, file = %file.path, attempt, error = %e, "download interrupted; resuming");
                    self.backoff(attempt).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn download_once(
        &self,
        job: &Job<'_>,
        carried: &mut Option<(Option<Sha256>, u64)>,
        progress: &mut (dyn FnMut(u64) + Send),
    ) -> Result<(), HubError> {
        let Job { uri, id, commit, file, partial } = *job;
        let io = |op| move |e| HubError::io(op, partial, e);
        let mut out = tokio::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(false)
            .open(partial)
            .await
            .map_err(io("opening"))?;
        let mut have = out.metadata().await.map_err(io("reading metadata of"))?.len();
        if have > file.size {
            out.set_len(0).await.map_err(io("truncating"))?;
            have = 0;
        }
        let mut hasher = match carried.take() {
            Some((h, n)) if n == have => h,
            _ if file.sha256.is_some() => Some(hash_prefix(partial, have).await?),
            _ => None,
        };
        progress(have);

        if have < file.size {
            let range = (have > 0).then_some(have);
            let expect = Expect { commit, size: file.size, path: file.path.as_str() };
            let (resp, host) = self.send_following(uri.clone(), range, Some(&expect)).await?;
            let status = resp.status();
            let mut offset = match status {
                StatusCode::PARTIAL_CONTENT if range.is_some() => {
                    check_content_range(resp.headers(), have, file)?;
                    have
                }
                StatusCode::OK => {
                    // The hub ignored the range (or there was none): start over.
                    if have > 0 {
                        out.set_len(0).await.map_err(io("truncating"))?;
                        progress(0);
                    }
                    hasher = file.sha256.as_ref().map(|_| Sha256::new());
                    0
                }
                StatusCode::RANGE_NOT_SATISFIABLE => {
                    // Our partial file does not fit what the hub has: discard it and let the
                    // retry start from zero.
                    out.set_len(0).await.map_err(io("truncating"))?;
                    return Err(HubError::Transport {
                        host,
                        message: "the hub refused the resume offset (416); restarting".into(),
                    });
                }
                StatusCode::PARTIAL_CONTENT => {
                    return Err(HubError::BadResponse {
                        what: "206 Partial Content to a request without a range".into(),
                    });
                }
                other => {
                    let revision = format!("{commit} (file {})", file.path);
                    return Err(status_error(other, id, &revision, "a download"));
                }
            };
            if let Some(len) = content_length(resp.headers())? {
                let announced = offset.checked_add(len);
                if announced != Some(file.size) {
                    return Err(HubError::SizeMismatch {
                        path: file.path.to_string(),
                        expected: file.size,
                        got: announced.unwrap_or(u64::MAX),
                    });
                }
            }
            out.seek(SeekFrom::Start(offset)).await.map_err(io("seeking in"))?;
            let mut writer = tokio::io::BufWriter::with_capacity(WRITE_BUFFER, out);
            let mut body = resp.into_body();
            let ended = loop {
                let frame = match tokio::time::timeout(self.inner.read_timeout, body.frame()).await
                {
                    Err(_) => {
                        break Err(HubError::Timeout {
                            host: host.clone(),
                            phase: "reading a download from",
                        });
                    }
                    Ok(None) => break Ok(()),
                    Ok(Some(Err(e))) => {
                        break Err(HubError::Transport {
                            host: host.clone(),
                            message: format!(
                                "connection lost after {offset} of {} bytes: {}",
                                file.size,
                                error_chain(&e)
                            ),
                        });
                    }
                    Ok(Some(Ok(frame))) => frame,
                };
                let Ok(data) = frame.into_data() else { continue };
                let end = offset.saturating_add(data.len() as u64);
                if end > file.size {
                    // More than announced: nothing this server sent can be trusted.
                    drop(writer);
                    let _ = tokio::fs::remove_file(partial).await;
                    return Err(HubError::SizeMismatch {
                        path: file.path.to_string(),
                        expected: file.size,
                        got: end,
                    });
                }
                if let Err(e) = writer.write_all(&data).await {
                    // The file length is now unknown; the next attempt re-hashes it.
                    return Err(HubError::io("writing", partial, e));
                }
                if let Some(h) = hasher.as_mut() {
                    h.update(&data);
                }
                offset = end;
                progress(offset);
            };
            writer.flush().await.map_err(io("writing"))?;
            out = writer.into_inner();
            if let Err(e) = ended {
                *carried = Some((hasher, offset));
                return Err(e);
            }
            if offset < file.size {
                *carried = Some((hasher, offset));
                return Err(HubError::Transport {
                    host,
                    message: format!("the download ended after {offset} of {} bytes", file.size),
                });
            }
        }

        out.sync_all().await.map_err(io("syncing"))?;
        drop(out);
        if let (Some(expected), Some(h)) = (&file.sha256, hasher) {
            let actual = hex(&h.finalize());
            if &actual != expected {
                let _ = tokio::fs::remove_file(partial).await;
                return Err(HubError::HashMismatch {
                    path: file.path.to_string(),
                    expected: expected.clone(),
                    actual,
                });
            }
        }
        Ok(())
    }

    /// Sends a GET and follows redirects by hand, checking every target. Returns the final
    /// response and the host it came from (for messages).
    async fn send_following(
        &self,
        mut uri: Uri,
        range_from: Option<u64>,
        expect: Option<&Expect<'_>>,
    ) -> Result<(Response<Incoming>, String), HubError> {
        let mut redirects = 0;
        loop {
            let (origin, scheme) = self.check_target(&uri)?;
            let host = origin.shown(scheme);
            let mut req = Request::get(uri.clone())
                .header(USER_AGENT, USER_AGENT_VALUE)
                .body(Empty::new())
                .map_err(|e| HubError::BadResponse { what: format!("building a request: {e}") })?;
            if origin == self.inner.endpoint
                && let Some(token) = &self.inner.token
            {
                req.headers_mut().insert(AUTHORIZATION, token.clone());
            }
            if let Some(from) = range_from {
                let v = HeaderValue::from_str(&format!("bytes={from}-"))
                    .map_err(|e| HubError::BadResponse { what: e.to_string() })?;
                req.headers_mut().insert(RANGE, v);
            }
            let wait = self.inner.connect_timeout + self.inner.read_timeout;
            let resp = match tokio::time::timeout(wait, self.inner.http.request(req)).await {
                Err(_) => {
                    return Err(HubError::Timeout { host, phase: "waiting for an answer from" });
                }
                Ok(Err(e)) => return Err(HubError::Transport { host, message: error_chain(&e) }),
                Ok(Ok(resp)) => resp,
            };
            if let Some(expect) = expect {
                check_expectations(resp.headers(), expect)?;
            }
            if !resp.status().is_redirection() || resp.status() == StatusCode::NOT_MODIFIED {
                return Ok((resp, host));
            }
            if redirects >= self.inner.max_redirects {
                return Err(HubError::TooManyRedirects { max: self.inner.max_redirects });
            }
            redirects += 1;
            let location = resp
                .headers()
                .get(LOCATION)
                .ok_or_else(|| HubError::BadResponse {
                    what: "a redirect without Location".into(),
                })?
                .to_str()
                .map_err(|_| HubError::BadResponse {
                    what: "a redirect Location that is not ASCII".into(),
                })?;
            uri = resolve_location(&uri, location)?;
        }
    }

    /// The scheme and host policy, applied to the endpoint and to every redirect target.
    fn check_target(&self, uri: &Uri) -> Result<(Origin, Scheme), HubError> {
        let (origin, scheme) = Origin::of(uri)?;
        let allowed = origin == self.inner.endpoint
            || self.inner.allowed.iter().any(|r| r.matches(&origin, scheme));
        if !allowed {
            return Err(HubError::ForbiddenRedirect { host: origin.shown(scheme) });
        }
        if scheme == Scheme::Http && !(self.inner.plain_http && origin.is_loopback()) {
            return Err(HubError::InsecureScheme {
                scheme: "http".into(),
                host: origin.shown(scheme),
            });
        }
        Ok((origin, scheme))
    }

    async fn read_limited(&self, mut body: Incoming, host: &str) -> Result<Vec<u8>, HubError> {
        let limit = self.inner.max_metadata_bytes;
        let mut out = Vec::new();
        loop {
            let frame = match tokio::time::timeout(self.inner.read_timeout, body.frame()).await {
                Err(_) => {
                    return Err(HubError::Timeout {
                        host: host.to_owned(),
                        phase: "reading an answer from",
                    });
                }
                Ok(None) => return Ok(out),
                Ok(Some(Err(e))) => {
                    return Err(HubError::Transport {
                        host: host.to_owned(),
                        message: error_chain(&e),
                    });
                }
                Ok(Some(Ok(frame))) => frame,
            };
            if let Ok(data) = frame.into_data() {
                if out.len() + data.len() > limit {
                    return Err(HubError::BadResponse {
                        what: format!("repository info larger than {limit} bytes"),
                    });
                }
                out.extend_from_slice(&data);
            }
        }
    }

    async fn backoff(&self, attempt: u32) {
        let factor = 1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX);
        let wait = self.inner.retry_backoff.saturating_mul(factor).min(MAX_BACKOFF);
        tokio::time::sleep(wait).await;
    }
}

fn parse_uri(url: &str) -> Result<Uri, HubError> {
    url.parse()
        .map_err(|_| HubError::Config { reason: format!("cannot build URL {:?}", shown(url)) })
}

/// Maps a non-success status to the precise error.
fn status_error(status: StatusCode, id: &HubId, revision: &str, what: &'static str) -> HubError {
    match status.as_u16() {
        404 => HubError::NotFound { id: id.to_string(), revision: shown(revision) },
        401 | 403 => HubError::Unauthorized { id: id.to_string(), status: status.as_u16() },
        429 => HubError::RateLimited,
        s => HubError::HubStatus { status: s, what },
    }
}

/// Resolves a `Location` header against the current URL: absolute, scheme-relative (`//h/p`)
/// or absolute-path (`/p`). Path-relative forms are not used by the hub and are refused.
fn resolve_location(current: &Uri, location: &str) -> Result<Uri, HubError> {
    let scheme = current.scheme_str().unwrap_or("https");
    let absolute = if location.starts_with("//") {
        format!("{scheme}:{location}")
    } else if location.starts_with('/') {
        let authority = current.authority().map(|a| a.as_str()).unwrap_or_default();
        format!("{scheme}://{authority}{location}")
    } else if location.contains("://") {
        location.to_owned()
    } else {
        return Err(HubError::BadResponse { what: "a path-relative redirect Location".into() });
    };
    absolute
        .parse()
        .map_err(|_| HubError::BadResponse { what: "a redirect Location that is not a URL".into() })
}

/// Headers the hub adds to download answers (`X-Repo-Commit`, `X-Linked-Size`) must agree
/// with the manifest when present.
fn check_expectations(headers: &HeaderMap, expect: &Expect<'_>) -> Result<(), HubError> {
    if let Some(v) = headers.get("x-repo-commit") {
        let v = v.to_str().unwrap_or("<not ASCII>");
        let got = Commit::parse(v)?;
        if &got != expect.commit {
            return Err(HubError::CommitMismatch {
                requested: expect.commit.to_string(),
                got: got.to_string(),
            });
        }
    }
    if let Some(v) = headers.get("x-linked-size") {
        let got = v.to_str().ok().and_then(|s| s.trim().parse::<u64>().ok()).ok_or_else(|| {
            HubError::BadResponse { what: format!("invalid X-Linked-Size for {}", expect.path) }
        })?;
        if got != expect.size {
            return Err(HubError::SizeMismatch {
                path: expect.path.to_owned(),
                expected: expect.size,
                got,
            });
        }
    }
    Ok(())
}

fn content_length(headers: &HeaderMap) -> Result<Option<u64>, HubError> {
    match headers.get(CONTENT_LENGTH) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .map(Some)
            .ok_or_else(|| HubError::BadResponse { what: "an invalid Content-Length".into() }),
    }
}

/// A 206 must cover exactly `bytes {have}-{size-1}/{size}`.
fn check_content_range(headers: &HeaderMap, have: u64, file: &FileEntry) -> Result<(), HubError> {
    let bad = |what: String| HubError::BadResponse { what };
    let value = headers
        .get(CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| bad(format!("206 without Content-Range for {}", file.path)))?;
    let parsed = value.strip_prefix("bytes ").and_then(|rest| {
        let (span, total) = rest.split_once('/')?;
        let (start, end) = span.split_once('-')?;
        Some((start.parse::<u64>().ok()?, end.parse::<u64>().ok()?, total.parse::<u64>().ok()?))
    });
    match parsed {
        Some((start, end, total))
            if start == have && end + 1 == file.size && total == file.size =>
        {
            Ok(())
        }
        _ => Err(bad(format!(
            "Content-Range {:?} does not continue {} at byte {have}",
            shown(value),
            file.path
        ))),
    }
}

/// Hashes the first `len` bytes of a partial file (on the blocking pool: it may be large).
async fn hash_prefix(path: &Path, len: u64) -> Result<Sha256, HubError> {
    let owned = path.to_owned();
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut hasher = Sha256::new();
        if len == 0 {
            return Ok(hasher);
        }
        let f = std::fs::File::open(&owned).map_err(|e| HubError::io("reading", &owned, e))?;
        let mut reader = f.take(len);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = reader.read(&mut buf).map_err(|e| HubError::io("reading", &owned, e))?;
            if n == 0 {
                return Ok(hasher);
            }
            hasher.update(&buf[..n]);
        }
    })
    .await
    .map_err(|e| HubError::io("hashing", path, std::io::Error::other(e.to_string())))?
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// An error and its sources on one line, for transport failures whose top-level message
/// ("client error (Connect)") says little.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        out.push_str(": ");
        out.push_str(&s.to_string());
        next = s.source();
    }
    shown(&out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(endpoint: &str, allowed: &[&str]) -> Result<HubClient, HubError> {
        HubClient::new(HubConfig {
            endpoint: endpoint.into(),
            allowed_hosts: allowed.iter().map(|s| (*s).to_owned()).collect(),
            ..Default::default()
        })
    }

    #[test]
    fn endpoint_policy() {
        assert!(client("https://huggingface.co", &[]).is_ok());
        assert!(client("https://mirror.example/hf/", &[]).is_ok());
        assert!(client("http://127.0.0.1:8080", &[]).is_ok());
        assert!(client("http://[::1]:8080", &[]).is_ok());
        assert!(client("http://localhost:8080", &[]).is_ok());
        for bad in [
            "http://huggingface.co",
            "http://10.0.0.1",
            "ftp://huggingface.co",
            "huggingface.co",
            "https://user:pw@huggingface.co",
            "https://huggingface.co/?x=1",
        ] {
            assert!(matches!(client(bad, &[]), Err(HubError::Config { .. })), "{bad}");
        }
        for bad in ["https://cdn.example", "*.hf.co", "cdn/x", ""] {
            assert!(
                matches!(client("https://huggingface.co", &[bad]), Err(HubError::Config { .. })),
                "{bad}"
            );
        }
        let bad_token =
            HubClient::new(HubConfig { token: Some("abc\ndef".into()), ..Default::default() });
        match bad_token {
            Err(e) => assert!(!e.to_string().contains("abc")),
            Ok(_) => panic!("a token with a newline was accepted"),
        }
    }

    #[test]
    fn target_policy() {
        let c = client("https://huggingface.co", &["cdn-lfs.hf.co", "127.0.0.1:9000"]).unwrap();
        let ok = |u: &str| c.check_target(&u.parse().unwrap());
        assert!(ok("https://huggingface.co/x").is_ok());
        assert!(ok("https://HUGGINGFACE.CO/x").is_ok());
        assert!(ok("https://huggingface.co:443/x").is_ok());
        assert!(ok("https://cdn-lfs.hf.co/x?sig=1").is_ok());
        assert!(matches!(
            ok("https://huggingface.co:8443/x"),
            Err(HubError::ForbiddenRedirect { host }) if host == "huggingface.co:8443"
        ));
        assert!(matches!(
            ok("https://evil.example/x"),
            Err(HubError::ForbiddenRedirect { host }) if host == "evil.example"
        ));
        assert!(matches!(
            ok("https://cdn-lfs.hf.co.evil.example/x"),
            Err(HubError::ForbiddenRedirect { .. })
        ));
        assert!(matches!(ok("http://cdn-lfs.hf.co/x"), Err(HubError::InsecureScheme { .. })));
        assert!(
            matches!(ok("http://127.0.0.1:9000/x"), Err(HubError::InsecureScheme { .. })),
            "plain http to loopback only when the endpoint itself is (tests)"
        );
        let test = client("http://127.0.0.1:8000", &["127.0.0.1:9000"]).unwrap();
        assert!(test.check_target(&"http://127.0.0.1:9000/x".parse().unwrap()).is_ok());
        assert!(matches!(
            test.check_target(&"http://127.0.0.2:9000/x".parse().unwrap()),
            Err(HubError::ForbiddenRedirect { .. })
        ));
        assert!("file:///etc/passwd".parse::<Uri>().is_err(), "no authority: never a target");
        assert!(matches!(ok("ftp://huggingface.co/x"), Err(HubError::InsecureScheme { .. })));
        assert!(matches!(ok("https://a@huggingface.co/x"), Err(HubError::BadResponse { .. })));
    }

    #[test]
    fn locations() {
        let cur: Uri = "https://huggingface.co/a/resolve/c/f".parse().unwrap();
        let r = |l: &str| resolve_location(&cur, l).map(|u| u.to_string());
        assert_eq!(r("/api/x").unwrap(), "https://huggingface.co/api/x");
        assert_eq!(r("//cdn.example/p").unwrap(), "https://cdn.example/p");
        assert_eq!(r("https://cdn.example/p?q=1").unwrap(), "https://cdn.example/p?q=1");
        assert!(r("relative/path").is_err());
        assert!(r("https://exa mple/").is_err());
    }

    #[test]
    fn content_ranges() {
        let f = FileEntry {
            path: crate::manifest::RepoPath::parse("m.gguf").unwrap(),
            size: 100,
            sha256: None,
        };
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(CONTENT_RANGE, HeaderValue::from_str(v).unwrap());
            m
        };
        assert!(check_content_range(&h("bytes 40-99/100"), 40, &f).is_ok());
        assert!(check_content_range(&h("bytes 0-99/100"), 40, &f).is_err());
        assert!(check_content_range(&h("bytes 40-98/100"), 40, &f).is_err());
        assert!(check_content_range(&h("bytes 40-99/*"), 40, &f).is_err());
        assert!(check_content_range(&HeaderMap::new(), 40, &f).is_err());
    }

    #[test]
    fn hex_encoding() {
        assert_eq!(hex(&[0, 15, 255]), "000fff");
        assert_eq!(
            hex(&Sha256::digest(b"")),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
