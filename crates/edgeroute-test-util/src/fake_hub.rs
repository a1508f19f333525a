//! A fake Hugging Face hub for tests: serves repositories from memory or from files on disk at
//! a fixed commit, speaks the parts of the hub protocol a model download uses, and misbehaves
//! on demand.
//!
//! Endpoints (ids are always `org/name`):
//! - `GET /api/models/{org}/{name}/revision/{rev}` — repository info with the `blobs=true`
//!   fields: `sha`, `siblings[].rfilename`, `size`, `blobId`, and `lfs {sha256, size}` for LFS
//!   files (weights). 404 for unknown repos and revisions; 401 for private repos without the
//!   token (as the real hub, gated repos list their files but refuse downloads).
//! - `HEAD`/`GET /{org}/{name}/resolve/{rev}/{path}` — the file, with `Range` support and the
//!   usual headers (`X-Repo-Commit`, `ETag`, `X-Linked-Etag`, `X-Linked-Size`,
//!   `Content-Length`, `Content-Range`, `Accept-Ranges`).
//!
//! Knobs: cut the connection after N bytes on the first download of each file, stall after N
//! bytes, slow every chunk down, redirect LFS downloads to another base URL (a second fake,
//! allowed or not), advertise a wrong SHA-256 or size, list raw (malicious) siblings, report a
//! bad commit, gate or hide a repo behind a token. Every download request is recorded (path,
//! `Range`, whether an `Authorization` header came with it).

use std::collections::{BTreeMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

/// The commit every fake repository is at unless told otherwise.
pub const FAKE_COMMIT: &str = "c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00";

/// The real model used in end-to-end tests.
pub const SMOLLM2_GGUF: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Where `scripts/setup-python.sh` puts the SmolLM2 GGUF:
/// `${EDGEROUTE_CACHE:-$HOME/.cache/edgeroute}/models/SmolLM2-135M-Instruct.Q4_1.gguf`.
#[allow(clippy::disallowed_methods)] // A test harness finding the test machine's cache.
pub fn smollm2_gguf_path() -> PathBuf {
    let cache = std::env::var_os("EDGEROUTE_CACHE").map(PathBuf::from).unwrap_or_else(|| {
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
        home.join(".cache").join("edgeroute")
    });
    cache.join("models").join(SMOLLM2_GGUF)
}

/// Size of each body chunk the fake sends.
const CHUNK: u64 = 64 * 1024;

/// Extensions the fake stores "in LFS" (with a SHA-256 in the listing), as the hub does for
/// weights.
const LFS_EXTENSIONS: &[&str] =
    &["gguf", "safetensors", "bin", "pt", "pth", "ckpt", "pkl", "pickle", "onnx"];

#[derive(Clone, Debug)]
enum Content {
    Memory(Bytes),
    Disk { path: PathBuf, len: u64 },
}

impl Content {
    fn len(&self) -> u64 {
        match self {
            Content::Memory(b) => b.len() as u64,
            Content::Disk { len, .. } => *len,
        }
    }
}

#[derive(Clone, Debug)]
struct FakeFile {
    path: String,
    content: Content,
    sha256: String,
    lfs: bool,
    advertised_sha256: Option<String>,
    advertised_size: Option<u64>,
}

impl FakeFile {
    fn sha256(&self) -> &str {
        self.advertised_sha256.as_deref().unwrap_or(&self.sha256)
    }
    fn size(&self) -> u64 {
        self.advertised_size.unwrap_or(self.content.len())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Access {
    Public,
    Gated,
    Private,
}

/// One repository of the fake hub.
#[derive(Clone, Debug)]
pub struct FakeRepo {
    id: String,
    commit: String,
    api_commit: Option<String>,
    files: Vec<FakeFile>,
    raw_siblings: Vec<serde_json::Value>,
    access: Access,
}

impl FakeRepo {
    /// An empty public repository `id` (`org/name`) at [`FAKE_COMMIT`].
    pub fn new(id: &str) -> Self {
        FakeRepo {
            id: id.to_owned(),
            commit: FAKE_COMMIT.to_owned(),
            api_commit: None,
            files: Vec::new(),
            raw_siblings: Vec::new(),
            access: Access::Public,
        }
    }

    /// Puts the repository at another commit.
    pub fn commit(mut self, commit: &str) -> Self {
        self.commit = commit.to_owned();
        self
    }

    /// Adds an in-memory file. Weights (by extension) are listed as LFS files with a SHA-256.
    pub fn file(mut self, path: &str, content: impl Into<Bytes>) -> Self {
        let content: Bytes = content.into();
        let sha256 = hex(&Sha256::digest(&content));
        self.push(path, Content::Memory(content), sha256);
        self
    }

    /// Adds a file served from disk (hashed now, streamed on each request).
    pub fn disk_file(mut self, path: &str, disk: &Path) -> std::io::Result<Self> {
        let mut f = std::fs::File::open(disk)?;
        let len = f.metadata()?.len();
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        self.push(path, Content::Disk { path: disk.to_owned(), len }, hex(&hasher.finalize()));
        Ok(self)
    }

    fn push(&mut self, path: &str, content: Content, sha256: String) {
        let ext = path.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase()).unwrap_or_default();
        self.files.push(FakeFile {
            path: path.to_owned(),
            content,
            sha256,
            lfs: LFS_EXTENSIONS.contains(&ext.as_str()),
            advertised_sha256: None,
            advertised_size: None,
        });
    }

    fn file_mut(&mut self, path: &str) -> &mut FakeFile {
        match self.files.iter_mut().find(|f| f.path == path) {
            Some(f) => f,
            None => panic!("fake repo {} has no file {path}", self.id),
        }
    }

    /// Lists (and serves) `path` as an LFS file or not.
    pub fn lfs(mut self, path: &str, lfs: bool) -> Self {
        self.file_mut(path).lfs = lfs;
        self
    }

    /// Advertises a SHA-256 that the content does not have (listing and `X-Linked-Etag`).
    pub fn wrong_sha(mut self, path: &str) -> Self {
        let f = self.file_mut(path);
        f.lfs = true;
        f.advertised_sha256 = Some(hex(&Sha256::digest(b"not the content")));
        self
    }

    /// Advertises a size that the content does not have (listing and `X-Linked-Size`).
    pub fn advertise_size(mut self, path: &str, size: u64) -> Self {
        self.file_mut(path).advertised_size = Some(size);
        self
    }

    /// Adds a sibling to the listing verbatim (e.g. `{"rfilename": "../../etc/passwd"}`);
    /// it is not downloadable.
    pub fn raw_sibling(mut self, sibling: serde_json::Value) -> Self {
        self.raw_siblings.push(sibling);
        self
    }

    /// Makes the listing report `sha` as the commit (e.g. a malformed one).
    pub fn api_commit(mut self, sha: &str) -> Self {
        self.api_commit = Some(sha.to_owned());
        self
    }

    /// Gated: listed freely, downloads need the token ([`FakeHub::require_token`]).
    pub fn gated(mut self) -> Self {
        self.access = Access::Gated;
        self
    }

    /// Private: everything needs the token; without it the listing answers 401.
    pub fn private(mut self) -> Self {
        self.access = Access::Private;
        self
    }

    /// The true SHA-256 of a file's content.
    pub fn sha256_of(&self, path: &str) -> Option<String> {
        self.files.iter().find(|f| f.path == path).map(|f| f.sha256.clone())
    }

    fn listing(&self) -> serde_json::Value {
        let mut siblings: Vec<serde_json::Value> = self
            .files
            .iter()
            .map(|f| {
                let mut s = serde_json::json!({
                    "rfilename": f.path,
                    "blobId": &f.sha256()[..40],
                    "size": f.size(),
                });
                if f.lfs {
                    s["lfs"] = serde_json::json!({
                        "sha256": f.sha256(),
                        "size": f.size(),
                        "pointerSize": 134,
                    });
                }
                s
            })
            .collect();
        siblings.extend(self.raw_siblings.iter().cloned());
        serde_json::json!({
            "_id": "0123456789abcdef01234567",
            "id": self.id,
            "modelId": self.id,
            "sha": self.api_commit.as_deref().unwrap_or(&self.commit),
            "private": self.access == Access::Private,
            "gated": if self.access == Access::Gated { serde_json::json!("manual") } else { serde_json::json!(false) },
            "disabled": false,
            "siblings": siblings,
        })
    }
}

/// One download request (`GET .../resolve/...`) as the fake saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DownloadRecord {
    pub path: String,
    /// The `Range` header, if any.
    pub range: Option<String>,
    /// Whether an `Authorization` header came with the request.
    pub authorized: bool,
}

#[derive(Debug, Default)]
struct Knobs {
    cut_first_after: Option<u64>,
    stall_after: Option<u64>,
    chunk_delay: Option<Duration>,
    redirect_to: Option<String>,
    token: Option<String>,
    ignore_ranges: bool,
}

#[derive(Debug)]
struct Shared {
    /// Downloads wait while this is false (see [`FakeHub::hold_downloads`]).
    gate: tokio::sync::watch::Sender<bool>,
    repos: Mutex<BTreeMap<String, FakeRepo>>,
    knobs: Mutex<Knobs>,
    downloads: Mutex<Vec<DownloadRecord>>,
    api_requests: Mutex<usize>,
    heads: Mutex<usize>,
    cut_done: Mutex<HashSet<String>>,
}

impl Default for Shared {
    fn default() -> Self {
        Shared {
            gate: tokio::sync::watch::Sender::new(true),
            repos: Mutex::default(),
            knobs: Mutex::default(),
            downloads: Mutex::default(),
            api_requests: Mutex::default(),
            heads: Mutex::default(),
            cut_done: Mutex::default(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The fake hub. Clones share state: keep one to turn knobs and read counters after handing
/// [`FakeHub::router`] to [`crate::spawn_router`].
#[derive(Clone, Debug, Default)]
pub struct FakeHub {
    shared: Arc<Shared>,
}

impl FakeHub {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a repository (builder style).
    pub fn with_repo(self, repo: FakeRepo) -> Self {
        self.add_repo(repo);
        self
    }

    /// Adds or replaces a repository.
    pub fn add_repo(&self, repo: FakeRepo) {
        lock(&self.shared.repos).insert(repo.id.clone(), repo);
    }

    /// Cuts the connection after `bytes` of the body on the first `GET` of each file (later
    /// requests for that file are served whole).
    pub fn cut_first_download_after(&self, bytes: u64) {
        lock(&self.shared.knobs).cut_first_after = Some(bytes);
    }

    /// Sends `bytes` of every download body, then nothing, never closing.
    pub fn stall_downloads_after(&self, bytes: u64) {
        lock(&self.shared.knobs).stall_after = Some(bytes);
    }

    /// Sleeps this long before each 64 KiB chunk of a download body.
    pub fn set_chunk_delay(&self, delay: Duration) {
        lock(&self.shared.knobs).chunk_delay = Some(delay);
    }

    /// Answers downloads of LFS files with `302 Location: {base_url}/{org}/{name}/resolve/
    /// {commit}/{path}` (as the hub does to its CDN), with the hub's headers.
    pub fn redirect_downloads_to(&self, base_url: &str) {
        lock(&self.shared.knobs).redirect_to = Some(base_url.trim_end_matches('/').to_owned());
    }

    /// Makes every download request wait (after it is recorded) until
    /// [`FakeHub::release_downloads`]: lets a test line up concurrent clients deterministically.
    pub fn hold_downloads(&self) {
        self.shared.gate.send_replace(false);
    }

    /// Lets held and future downloads proceed.
    pub fn release_downloads(&self) {
        self.shared.gate.send_replace(true);
    }

    /// Ignores `Range` headers: every download answers 200 with the whole file (as some
    /// servers do), so a client must restart rather than append.
    pub fn ignore_ranges(&self) {
        lock(&self.shared.knobs).ignore_ranges = true;
    }

    /// The token that unlocks gated and private repositories.
    pub fn require_token(&self, token: &str) {
        lock(&self.shared.knobs).token = Some(token.to_owned());
    }

    /// Every download (`GET`) request so far, in order.
    pub fn downloads(&self) -> Vec<DownloadRecord> {
        lock(&self.shared.downloads).clone()
    }

    /// Download (`GET`) requests for `path` so far.
    pub fn download_count(&self, path: &str) -> usize {
        lock(&self.shared.downloads).iter().filter(|d| d.path == path).count()
    }

    /// Repository-info requests so far.
    pub fn api_request_count(&self) -> usize {
        *lock(&self.shared.api_requests)
    }

    /// `HEAD` requests so far.
    pub fn head_count(&self) -> usize {
        *lock(&self.shared.heads)
    }

    pub fn router(&self) -> Router {
        Router::new()
            .route("/api/models/{org}/{name}/revision/{rev}", get(api))
            .route("/{org}/{name}/resolve/{rev}/{*path}", get(download).head(head))
            .with_state(self.shared.clone())
    }
}

fn error(status: StatusCode, code: &'static str, message: &str) -> Response {
    let mut resp = (status, axum::Json(serde_json::json!({ "error": message }))).into_response();
    resp.headers_mut().insert("x-error-code", HeaderValue::from_static(code));
    resp
}

fn authorized(shared: &Shared, headers: &HeaderMap) -> bool {
    let token = lock(&shared.knobs).token.clone();
    match (token, headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok())) {
        (Some(t), Some(v)) => v == format!("Bearer {t}"),
        _ => false,
    }
}

async fn api(
    State(shared): State<Arc<Shared>>,
    UrlPath((org, name, rev)): UrlPath<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    *lock(&shared.api_requests) += 1;
    let id = format!("{org}/{name}");
    let Some(repo) = lock(&shared.repos).get(&id).cloned() else {
        return error(StatusCode::NOT_FOUND, "RepoNotFound", "Repository not found");
    };
    if repo.access == Access::Private && !authorized(&shared, &headers) {
        // The real hub cannot tell "private" from "missing" to an anonymous caller.
        return error(StatusCode::UNAUTHORIZED, "RepoNotFound", "Repository not found");
    }
    if rev != "main" && rev != repo.commit {
        return error(StatusCode::NOT_FOUND, "RevisionNotFound", "Invalid rev id");
    }
    axum::Json(repo.listing()).into_response()
}

async fn head(
    State(shared): State<Arc<Shared>>,
    UrlPath((org, name, rev, path)): UrlPath<(String, String, String, String)>,
    headers: HeaderMap,
) -> Response {
    *lock(&shared.heads) += 1;
    serve(&shared, &org, &name, &rev, &path, &headers, false).await
}

async fn download(
    State(shared): State<Arc<Shared>>,
    UrlPath((org, name, rev, path)): UrlPath<(String, String, String, String)>,
    headers: HeaderMap,
) -> Response {
    lock(&shared.downloads).push(DownloadRecord {
        path: path.clone(),
        range: headers.get(header::RANGE).and_then(|v| v.to_str().ok()).map(str::to_owned),
        authorized: headers.contains_key(header::AUTHORIZATION),
    });
    let _ = shared.gate.subscribe().wait_for(|open| *open).await;
    serve(&shared, &org, &name, &rev, &path, &headers, true).await
}

async fn serve(
    shared: &Arc<Shared>,
    org: &str,
    name: &str,
    rev: &str,
    path: &str,
    headers: &HeaderMap,
    with_body: bool,
) -> Response {
    let id = format!("{org}/{name}");
    let Some(repo) = lock(&shared.repos).get(&id).cloned() else {
        return error(StatusCode::NOT_FOUND, "RepoNotFound", "Repository not found");
    };
    if repo.access != Access::Public && !authorized(shared, headers) {
        return error(
            StatusCode::UNAUTHORIZED,
            "GatedRepo",
            "Access to this model is restricted; you must be authenticated",
        );
    }
    if rev != "main" && rev != repo.commit {
        return error(StatusCode::NOT_FOUND, "RevisionNotFound", "Invalid rev id");
    }
    let Some(file) = repo.files.iter().find(|f| f.path == path).cloned() else {
        return error(StatusCode::NOT_FOUND, "EntryNotFound", "Entry not found");
    };
    let (cut, stall, delay, redirect, ignore_ranges) = {
        let k = lock(&shared.knobs);
        (k.cut_first_after, k.stall_after, k.chunk_delay, k.redirect_to.clone(), k.ignore_ranges)
    };

    let mut common = HeaderMap::new();
    let put = |h: &mut HeaderMap, name: &'static str, value: String| {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(name, v);
        }
    };
    put(&mut common, "x-repo-commit", repo.commit.clone());
    put(&mut common, "accept-ranges", "bytes".into());
    if file.lfs {
        put(&mut common, "etag", format!("\"{}\"", file.sha256()));
        put(&mut common, "x-linked-etag", format!("\"{}\"", file.sha256()));
        put(&mut common, "x-linked-size", file.size().to_string());
    } else {
        put(&mut common, "etag", format!("\"{}\"", &file.sha256()[..40]));
    }

    if let Some(base) = redirect.filter(|_| file.lfs) {
        let mut resp = StatusCode::FOUND.into_response();
        resp.headers_mut().extend(common);
        put(resp.headers_mut(), "location", format!("{base}/{id}/resolve/{}/{path}", repo.commit));
        return resp;
    }

    let len = file.content.len();
    let range = headers
        .get(header::RANGE)
        .filter(|_| !ignore_ranges)
        .and_then(|v| v.to_str().ok())
        .map(parse_range);
    let (status, start, end) = match range {
        None => (StatusCode::OK, 0, len),
        Some(Some((start, last))) if start < len => {
            let end = last.map_or(len, |l| (l + 1).min(len));
            (StatusCode::PARTIAL_CONTENT, start, end)
        }
        Some(_) => {
            let mut resp = StatusCode::RANGE_NOT_SATISFIABLE.into_response();
            put(resp.headers_mut(), "content-range", format!("bytes */{len}"));
            return resp;
        }
    };
    let mut resp_headers = common;
    put(&mut resp_headers, "content-length", (end - start).to_string());
    if status == StatusCode::PARTIAL_CONTENT {
        put(&mut resp_headers, "content-range", format!("bytes {start}-{}/{len}", end - 1));
    }
    let body = if with_body {
        let first = lock(&shared.cut_done).insert(path.to_owned());
        let cut = cut.filter(|_| first);
        body_stream(file.content.clone(), start, end, cut, stall, delay)
    } else {
        Body::empty()
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    resp.headers_mut().extend(resp_headers);
    resp
}

/// `bytes=N-` or `bytes=N-M` → `(N, Some(M))`; `None` if malformed.
fn parse_range(value: &str) -> Option<(u64, Option<u64>)> {
    let spec = value.strip_prefix("bytes=")?;
    let (start, end) = spec.split_once('-')?;
    let start = start.trim().parse().ok()?;
    let end = match end.trim() {
        "" => None,
        e => Some(e.parse().ok()?),
    };
    Some((start, end))
}

struct BodyState {
    content: Content,
    file: Option<tokio::fs::File>,
    pos: u64,
    end: u64,
    sent: u64,
    cut: Option<u64>,
    stall: Option<u64>,
    delay: Option<Duration>,
    failed: bool,
}

fn body_stream(
    content: Content,
    start: u64,
    end: u64,
    cut: Option<u64>,
    stall: Option<u64>,
    delay: Option<Duration>,
) -> Body {
    let state = BodyState {
        content,
        file: None,
        pos: start,
        end,
        sent: 0,
        cut,
        stall,
        delay,
        failed: false,
    };
    let stream = futures_util::stream::unfold(state, |mut st| async move {
        if st.failed || st.pos >= st.end {
            return None;
        }
        if st.cut.is_some_and(|c| st.sent >= c) {
            st.failed = true;
            let err = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "fake hub: cut");
            return Some((Err(err), st));
        }
        if st.stall.is_some_and(|s| st.sent >= s) {
            std::future::pending::<()>().await;
        }
        if let Some(d) = st.delay {
            tokio::time::sleep(d).await;
        }
        let mut n = CHUNK.min(st.end - st.pos);
        for limit in [st.cut, st.stall].into_iter().flatten() {
            n = n.min(limit - st.sent);
        }
        let chunk = match read_chunk(&mut st, n).await {
            Ok(c) => c,
            Err(e) => {
                st.failed = true;
                return Some((Err(e), st));
            }
        };
        st.pos += n;
        st.sent += n;
        Some((Ok(chunk), st))
    });
    Body::from_stream(stream)
}

async fn read_chunk(st: &mut BodyState, n: u64) -> std::io::Result<Bytes> {
    match &st.content {
        Content::Memory(b) => Ok(b.slice(st.pos as usize..(st.pos + n) as usize)),
        Content::Disk { path, .. } => {
            if st.file.is_none() {
                let mut f = tokio::fs::File::open(path).await?;
                f.seek(std::io::SeekFrom::Start(st.pos)).await?;
                st.file = Some(f);
            }
            let Some(f) = st.file.as_mut() else {
                return Err(std::io::Error::other("fake hub: file not open"));
            };
            let mut buf = vec![0u8; n as usize];
            f.read_exact(&mut buf).await?;
            Ok(Bytes::from(buf))
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=10-"), Some((10, None)));
        assert_eq!(parse_range("bytes=0-0"), Some((0, Some(0))));
        assert_eq!(parse_range("items=0-"), None);
        assert_eq!(parse_range("bytes=x-"), None);
    }
}
