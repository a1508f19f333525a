//! The one error type of this crate, classified for the HTTP layer.
//!
//! Messages name what is wrong and what to do about it. They never contain the hub token, and
//! never a full download URL (CDN URLs carry signatures in their query): only host names.
//! Values that came from outside (an operator's id, a server's file name) are shown escaped
//! (`{:?}`) and truncated, so they cannot forge log lines.

use std::path::PathBuf;
use std::sync::Arc;

/// Longest outside-supplied value quoted back in an error message.
const MAX_SHOWN: usize = 160;

/// Everything that can go wrong resolving, downloading or installing a model.
///
/// `Clone` so that every caller sharing one download receives the same error.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum HubError {
    /// The model id is not `name` or `org/name` in the allowed alphabet.
    #[error("invalid model id {id:?}: {reason}")]
    InvalidModelId { id: String, reason: &'static str },

    /// The revision is neither a safe branch/tag name nor a 40-hex commit.
    #[error("invalid revision {revision:?}: {reason}")]
    InvalidRevision { revision: String, reason: &'static str },

    /// A local model path must be absolute.
    #[error("local model path {path:?} is not absolute; give the full path")]
    LocalPathNotAbsolute { path: PathBuf },

    /// A local model path does not exist (or cannot be resolved).
    #[error("local model path {path:?} does not exist or cannot be read")]
    LocalPathNotFound { path: PathBuf },

    /// A local model path resolves (after following symlinks) outside every allowed root.
    #[error("local model path {path:?} is outside the allowed model roots")]
    LocalPathForbidden { path: PathBuf },

    /// A file-selection pattern is malformed.
    #[error("invalid file pattern {pattern:?}: {reason}")]
    InvalidFilter { pattern: String, reason: &'static str },

    /// The hub does not know this model (or this revision of it).
    #[error("model {id} at revision {revision} was not found on the hub")]
    NotFound { id: String, revision: String },

    /// The hub refused access: the repository is gated or private (the hub also answers this
    /// way for repositories that do not exist when no token is sent).
    #[error(
        "the hub refused access to {id} (HTTP {status}): the model is gated, private or does \
         not exist; if it exists, set HF_TOKEN to a token that has been granted access"
    )]
    Unauthorized { id: String, status: u16 },

    /// The repository's only weights are pickle files, which run code when loaded.
    #[error(
        "model {id} only has pickle weights ({files}), which can execute code when loaded; \
         use a repository that ships safetensors or GGUF weights"
    )]
    PickleRefused { id: String, files: String },

    /// What the filter selects cannot be loaded: no `.gguf`, and not `config.json` plus
    /// `*.safetensors`.
    #[error("model {id} has nothing loadable for this selection: {reason}")]
    NoLoadableWeights { id: String, reason: String },

    /// A redirect pointed at a host that is not in `allowed_hosts`. It was not followed.
    #[error(
        "refused a redirect to host {host:?}: it is not in hub.allowed_hosts (add it there to \
         allow downloads from it)"
    )]
    ForbiddenRedirect { host: String },

    /// A URL (endpoint or redirect target) is not HTTPS (plain HTTP is allowed to loopback
    /// addresses only, for tests).
    #[error(
        "refused a {scheme:?} URL to host {host:?}: only https is allowed (http only to loopback)"
    )]
    InsecureScheme { scheme: String, host: String },

    /// A selected file is larger than `max_file_bytes`.
    #[error("file {path} is {size} bytes, more than hub.max_file_bytes ({max})")]
    FileTooLarge { path: String, size: u64, max: u64 },

    /// The model repository's filesystem has too little free space for this model.
    #[error(
        "not enough disk space for the model: {needed} bytes needed (including the safety \
         margin), {free} free under the model repository"
    )]
    InsufficientDisk { needed: u64, free: u64 },

    /// More redirects than `max_redirects`.
    #[error("the hub redirected more than {max} times")]
    TooManyRedirects { max: u32 },

    /// The hub sent a commit id that is not 40 lowercase hex digits.
    #[error("the hub sent an invalid commit id {value:?} (expected 40 lowercase hex digits)")]
    BadCommit { value: String },

    /// The hub answered for a different commit than the one asked for.
    #[error("asked the hub for commit {requested} but it answered for {got}")]
    CommitMismatch { requested: String, got: String },

    /// The hub listed a file name that could escape or confuse the model directory.
    #[error("the hub listed an unsafe file name {path:?}: {reason}")]
    UnsafePath { path: String, reason: &'static str },

    /// The hub sent a SHA-256 that is not 64 hex digits.
    #[error("the hub sent an invalid SHA-256 {value:?} for {path}")]
    BadHash { path: String, value: String },

    /// A downloaded file does not hash to what the hub announced. The partial file is deleted.
    #[error(
        "{path}: SHA-256 mismatch (expected {expected}, got {actual}); the download was discarded"
    )]
    HashMismatch { path: String, expected: String, actual: String },

    /// A downloaded file (or a response header) disagrees with the announced size.
    #[error("{path}: size mismatch (announced {expected} bytes, the hub sent {got})")]
    SizeMismatch { path: String, expected: u64, got: u64 },

    /// A response could not be understood.
    #[error("the hub sent a malformed response: {what}")]
    BadResponse { what: String },

    /// The hub answered 429.
    #[error("the hub is rate-limiting this node (HTTP 429); retry later")]
    RateLimited,

    /// The hub answered with an unexpected status (5xx, or a 4xx not listed above).
    #[error("the hub answered HTTP {status} to {what}")]
    HubStatus { status: u16, what: &'static str },

    /// Connecting, or the connection failed mid-way.
    #[error("connection to {host} failed: {message}")]
    Transport { host: String, message: String },

    /// No progress within the configured timeout.
    #[error("timed out {phase} {host}")]
    Timeout { host: String, phase: &'static str },

    /// A local filesystem operation failed.
    #[error("{op} {path:?}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: Arc<std::io::Error>,
    },

    /// The hub or installer configuration is unusable.
    #[error("invalid hub configuration: {reason}")]
    Config { reason: String },

    /// The model is being installed or removed right now.
    #[error("model {id} at commit {commit} is being installed or removed; retry when it is done")]
    Busy { id: String, commit: String },

    /// The install was cancelled before it finished (nothing was installed).
    #[error("the model install was cancelled before it finished; nothing was installed")]
    Cancelled,
}

impl HubError {
    /// True when the request (or the model asked for) is at fault, so the HTTP layer should
    /// answer 4xx; false for faults of this node (disk, I/O, configuration) or of the hub
    /// (5xx, malformed or hostile answers, transport), which deserve a 5xx.
    pub fn is_client_error(&self) -> bool {
        use HubError::*;
        match self {
            InvalidModelId { .. }
            | InvalidRevision { .. }
            | LocalPathNotAbsolute { .. }
            | LocalPathNotFound { .. }
            | LocalPathForbidden { .. }
            | InvalidFilter { .. }
            | NotFound { .. }
            | Unauthorized { .. }
            | PickleRefused { .. }
            | NoLoadableWeights { .. }
            | ForbiddenRedirect { .. }
            | InsecureScheme { .. }
            | FileTooLarge { .. }
            | Busy { .. }
            | Cancelled => true,
            InsufficientDisk { .. }
            | TooManyRedirects { .. }
            | BadCommit { .. }
            | CommitMismatch { .. }
            | UnsafePath { .. }
            | BadHash { .. }
            | HashMismatch { .. }
            | SizeMismatch { .. }
            | BadResponse { .. }
            | RateLimited
            | HubStatus { .. }
            | Transport { .. }
            | Timeout { .. }
            | Io { .. }
            | Config { .. } => false,
        }
    }

    /// A stable, machine-readable code for API answers and metrics labels.
    pub fn code(&self) -> &'static str {
        use HubError::*;
        match self {
            InvalidModelId { .. } => "invalid_model_id",
            InvalidRevision { .. } => "invalid_revision",
            LocalPathNotAbsolute { .. } => "local_path_not_absolute",
            LocalPathNotFound { .. } => "local_path_not_found",
            LocalPathForbidden { .. } => "local_path_forbidden",
            InvalidFilter { .. } => "invalid_file_pattern",
            NotFound { .. } => "model_not_found",
            Unauthorized { .. } => "hub_unauthorized",
            PickleRefused { .. } => "pickle_refused",
            NoLoadableWeights { .. } => "no_loadable_weights",
            ForbiddenRedirect { .. } => "forbidden_redirect",
            InsecureScheme { .. } => "insecure_scheme",
            FileTooLarge { .. } => "file_too_large",
            InsufficientDisk { .. } => "insufficient_disk",
            TooManyRedirects { .. } => "too_many_redirects",
            BadCommit { .. } => "hub_bad_commit",
            CommitMismatch { .. } => "hub_commit_mismatch",
            UnsafePath { .. } => "hub_unsafe_path",
            BadHash { .. } => "hub_bad_hash",
            HashMismatch { .. } => "hash_mismatch",
            SizeMismatch { .. } => "size_mismatch",
            BadResponse { .. } => "hub_bad_response",
            RateLimited => "hub_rate_limited",
            HubStatus { .. } => "hub_unavailable",
            Transport { .. } => "hub_transport",
            Timeout { .. } => "hub_timeout",
            Io { .. } => "io_error",
            Config { .. } => "hub_config",
            Busy { .. } => "model_busy",
            Cancelled => "cancelled",
        }
    }

    /// True for faults a later attempt may not hit: transport failures, timeouts, 429 and 5xx.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            HubError::Transport { .. }
                | HubError::Timeout { .. }
                | HubError::RateLimited
                | HubError::HubStatus { status: 500..=599, .. }
        )
    }

    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        HubError::Io { op, path: path.into(), source: Arc::new(source) }
    }
}

/// An outside-supplied value, truncated for quoting in a message (the message escapes it).
pub(crate) fn shown(value: &str) -> String {
    if value.len() <= MAX_SHOWN {
        return value.to_owned();
    }
    let mut end = MAX_SHOWN;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &value[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_values_are_truncated_on_a_char_boundary() {
        let s = "é".repeat(200);
        let out = shown(&s);
        assert!(out.len() <= MAX_SHOWN + '…'.len_utf8());
        assert!(out.ends_with('…'));
        assert_eq!(shown("short"), "short");
    }

    #[test]
    fn classification() {
        assert!(HubError::ForbiddenRedirect { host: "x".into() }.is_client_error());
        assert!(!HubError::InsufficientDisk { needed: 2, free: 1 }.is_client_error());
        assert!(HubError::HubStatus { status: 503, what: "x" }.is_retryable());
        assert!(!HubError::HubStatus { status: 400, what: "x" }.is_retryable());
        assert_eq!(HubError::Cancelled.code(), "cancelled");
    }
}
