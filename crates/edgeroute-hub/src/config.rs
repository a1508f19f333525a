//! Configuration of the hub client. A plain struct that comes in from outside: this crate
//! never reads the environment (the binary maps `HF_ENDPOINT` and `HF_TOKEN` onto it).

use std::fmt;

use serde::{Deserialize, Serialize};

/// The public Hugging Face hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// How to reach the hub, whom to trust, and the limits on what it may send.
///
/// Unknown keys are errors, so a typo in a config file does not silently fall back to a
/// default.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HubConfig {
    /// Base URL of the hub, optionally with a path prefix (a mirror). Must be `https://`;
    /// `http://` is accepted only for a loopback host (tests). Default `https://huggingface.co`.
    pub endpoint: String,
    /// Access token for gated and private models. Sent as `Authorization: Bearer` only to the
    /// endpoint's own host and port, never to a redirect target (CDN URLs are pre-signed and
    /// do not need it). Never logged or shown in errors. Default: none.
    pub token: Option<String>,
    /// Hosts that downloads may be redirected to, besides the endpoint itself: `host` (on the
    /// scheme's default port) or `host:port`. A redirect anywhere else is refused. Default:
    /// empty. On huggingface.co, large (LFS) files redirect to CDN hosts, currently
    /// `cas-bridge.xethub.hf.co`, `cdn-lfs.hf.co` and `cdn-lfs-us-1.hf.co`: list the ones your
    /// downloads use.
    pub allowed_hosts: Vec<String>,
    /// Time to establish a TCP connection. Default 10 000 ms.
    pub connect_timeout_ms: u64,
    /// Longest wait for a response head or for the next piece of a body. Default 30 000 ms.
    pub read_timeout_ms: u64,
    /// Most redirects followed for one request. Default 5.
    pub max_redirects: u32,
    /// Largest single file accepted. Default 128 GiB.
    pub max_file_bytes: u64,
    /// Largest repository-info (JSON) answer accepted. Default 16 MiB.
    pub max_metadata_bytes: usize,
    /// Retries of one request after a transport failure, timeout, 429 or 5xx; a download
    /// resumes where it stopped. Default 3.
    pub retries: u32,
    /// Wait before the first retry, doubled for each further one. Default 500 ms.
    pub retry_backoff_ms: u64,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            endpoint: DEFAULT_ENDPOINT.to_owned(),
            token: None,
            allowed_hosts: Vec::new(),
            connect_timeout_ms: 10_000,
            read_timeout_ms: 30_000,
            max_redirects: 5,
            max_file_bytes: 128 << 30,
            max_metadata_bytes: 16 << 20,
            retries: 3,
            retry_backoff_ms: 500,
        }
    }
}

impl fmt::Debug for HubConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubConfig")
            .field("endpoint", &self.endpoint)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("allowed_hosts", &self.allowed_hosts)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("read_timeout_ms", &self.read_timeout_ms)
            .field("max_redirects", &self.max_redirects)
            .field("max_file_bytes", &self.max_file_bytes)
            .field("max_metadata_bytes", &self.max_metadata_bytes)
            .field("retries", &self.retries)
            .field("retry_backoff_ms", &self.retry_backoff_ms)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_strictness() {
        let c: HubConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c, HubConfig::default());
        assert_eq!(c.endpoint, "https://huggingface.co");
        assert_eq!(c.max_redirects, 5);
        let typo = serde_json::from_str::<HubConfig>(r#"{"alowed_hosts": []}"#);
        assert!(typo.is_err());
    }

    #[test]
    fn debug_hides_the_token() {
        let c = HubConfig { token: Some("hf_secret".into()), ..Default::default() };
        let shown = format!("{c:?}");
        assert!(!shown.contains("hf_secret"));
        assert!(shown.contains("redacted"));
    }
}
