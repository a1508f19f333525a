//! NVIDIA Triton's model repository API (KServe v2 extension): list, load and unload models.
//!
//! Inference goes through Triton's OpenAI-compatible frontend (the `openai` backend); this
//! client only tells Triton which models of its repository to hold in GPU memory.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use serde::Deserialize;

/// One entry of `POST /v2/repository/index`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct IndexEntry {
    pub name: String,
    #[serde(default)]
    pub version: Option<String>,
    /// `READY`, `LOADING`, `UNAVAILABLE`, or absent when never loaded.
    #[serde(default)]
    pub state: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum TritonError {
    #[error("Triton is unreachable: {0}")]
    Unreachable(String),
    #[error("Triton refused: {0}")]
    Refused(String),
    #[error("Triton did not answer within {0:?}")]
    Timeout(Duration),
}

#[derive(Clone)]
pub struct TritonRepository {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
    timeout: Duration,
    /// The header Triton's `--http-restricted-api=model-repository:<name>=<value>` requires on
    /// every repository call (its value never printed).
    restricted: Option<(HeaderName, HeaderValue)>,
}

impl std::fmt::Debug for TritonRepository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TritonRepository").field("base", &self.base).finish_non_exhaustive()
    }
}

/// A model name as Triton's repository uses it: one directory name.
pub fn valid_model_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl TritonRepository {
    /// `base` is Triton's HTTP endpoint (`http://127.0.0.1:8000`); `timeout` bounds each call,
    /// including a load (which can take minutes for large models).
    pub fn new(base: &str, timeout: Duration) -> Self {
        let opts = edgeroute_http::client::ClientOptions {
            connect_timeout: Duration::from_secs(2),
            ..Default::default()
        };
        TritonRepository {
            client: edgeroute_http::client::plain_client(&opts),
            base: base.trim_end_matches('/').to_owned(),
            timeout,
            restricted: None,
        }
    }

    /// Sends `name: value` on every repository call: Triton started with
    /// `--http-restricted-api=model-repository:<name>=<value>` refuses calls without it, so a
    /// process that reaches Triton's port cannot load or unload models.
    pub fn with_restricted_header(mut self, name: &str, value: &str) -> Result<Self, String> {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("`{name}` is not a valid header name"))?;
        let mut value = HeaderValue::from_str(value)
            .map_err(|_| format!("the value for header `{name}` is not a valid header value"))?;
        value.set_sensitive(true);
        self.restricted = Some((name, value));
        Ok(self)
    }

    async fn post(
        &self,
        path: &str,
        body: &'static str,
    ) -> Result<(StatusCode, Bytes), TritonError> {
        let mut req = Request::post(format!("{}{path}", self.base))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .map_err(|e| TritonError::Refused(e.to_string()))?;
        if let Some((name, value)) = &self.restricted {
            req.headers_mut().insert(name.clone(), value.clone());
        }
        let call = async {
            let res = self
                .client
                .request(req)
                .await
                .map_err(|e| TritonError::Unreachable(e.to_string()))?;
            let status = res.status();
            let bytes = Limited::new(res.into_body(), 4 * 1024 * 1024)
                .collect()
                .await
                .map_err(|e| TritonError::Unreachable(e.to_string()))?
                .to_bytes();
            Ok((status, bytes))
        };
        tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| TritonError::Timeout(self.timeout))?
    }

    fn check(status: StatusCode, body: &Bytes) -> Result<(), TritonError> {
        if status.is_success() {
            return Ok(());
        }
        let msg = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
            .unwrap_or_else(|| format!("{status}: {}", String::from_utf8_lossy(body)));
        Err(TritonError::Refused(msg))
    }

    pub async fn index(&self) -> Result<Vec<IndexEntry>, TritonError> {
        let (status, body) = self.post("/v2/repository/index", "{}").await?;
        Self::check(status, &body)?;
        serde_json::from_slice(&body)
            .map_err(|e| TritonError::Refused(format!("malformed index: {e}")))
    }

    /// Waits until the repository index lists `name` (copied into Triton's repository, by
    /// the `edgeroute watch` sidecar or by the node itself), polling every `every`, until
    /// `deadline`. An unreachable Triton is retried until then too: it may be restarting.
    pub async fn wait_listed(
        &self,
        name: &str,
        deadline: tokio::time::Instant,
        every: Duration,
    ) -> Result<(), TritonError> {
        loop {
            let last = match self.index().await {
                Ok(entries) if entries.iter().any(|e| e.name == name) => return Ok(()),
                Ok(_) => None,
                Err(e) => Some(e),
            };
            if tokio::time::Instant::now() + every > deadline {
                let why = last.map_or_else(String::new, |e| format!(" (last error: {e})"));
                return Err(TritonError::Refused(format!(
                    "`{name}` did not appear in Triton's model repository in time{why}: is the \
                     `edgeroute watch` sidecar running, and does it trust this node's seal key? \
                     (its log names every refusal)"
                )));
            }
            tokio::time::sleep(every).await;
        }
    }

    pub async fn load(&self, name: &str) -> Result<(), TritonError> {
        if !valid_model_name(name) {
            return Err(TritonError::Refused(format!(
                "`{name}` is not a valid repository model name"
            )));
        }
        let (status, body) = self.post(&format!("/v2/repository/models/{name}/load"), "{}").await?;
        Self::check(status, &body)
    }

    pub async fn unload(&self, name: &str) -> Result<(), TritonError> {
        if !valid_model_name(name) {
            return Err(TritonError::Refused(format!(
                "`{name}` is not a valid repository model name"
            )));
        }
        let (status, body) =
            self.post(&format!("/v2/repository/models/{name}/unload"), "{}").await?;
        Self::check(status, &body)
    }
}
