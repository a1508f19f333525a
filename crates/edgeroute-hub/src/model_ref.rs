//! What an operator may ask for: a hub model id with a revision, or a local path under an
//! allowed root. Parsing is strict and each refusal names the rule broken.
//!
//! These types only exist validated: a [`HubId`] is always safe to put in a URL path and in a
//! directory name, a [`Revision`] is safe in a URL path segment once `/` is escaped, and a
//! [`LocalModel`] is a canonical path (symlinks resolved) under an allowed root.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::error::{HubError, shown};

/// Longest id part (org or name), as on the hub.
const MAX_PART: usize = 96;
/// Longest branch or tag name.
const MAX_REVISION: usize = 128;
/// The revision used when none is given.
pub const DEFAULT_REVISION: &str = "main";

/// A hub model id: `name` or `org/name`, each part `[A-Za-z0-9][A-Za-z0-9._-]{0,95}` without
/// `..` or `--` (both reserved by the hub; `--` also separates org and name on disk).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HubId {
    org: Option<String>,
    name: String,
}

impl HubId {
    /// Parses and validates an id.
    pub fn parse(id: &str) -> Result<Self, HubError> {
        let bad = |reason| HubError::InvalidModelId { id: shown(id), reason };
        if id.is_empty() {
            return Err(bad("empty"));
        }
        if id.contains("://") {
            return Err(bad("looks like a URL; give the id (`org/name`), not a link"));
        }
        check_common(id).map_err(bad)?;
        let mut parts = id.split('/');
        let (org, name) = match (parts.next(), parts.next(), parts.next()) {
            (Some(name), None, _) => (None, name),
            (Some(org), Some(name), None) => (Some(org), name),
            _ => return Err(bad("at most one `/` is allowed (`org/name`)")),
        };
        if let Some(org) = org {
            check_part(org).map_err(bad)?;
        }
        check_part(name).map_err(bad)?;
        Ok(HubId { org: org.map(str::to_owned), name: name.to_owned() })
    }

    /// The organisation or user, if the id has one.
    pub fn org(&self) -> Option<&str> {
        self.org.as_deref()
    }

    /// The model name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The directory name of this model in the repository: `org--name`, or `name`.
    ///
    /// Unambiguous because parts never contain `--`.
    pub fn dir_name(&self) -> String {
        match &self.org {
            Some(org) => format!("{org}--{}", self.name),
            None => self.name.clone(),
        }
    }
}

impl fmt::Display for HubId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.org {
            Some(org) => write!(f, "{org}/{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// Rules shared by ids and revisions, checked first so that the reason is the most telling.
fn check_common(s: &str) -> Result<(), &'static str> {
    if s.contains('%') {
        return Err("percent-encoding is not allowed");
    }
    if s.contains('\\') {
        return Err("backslashes are not allowed");
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("whitespace and control characters are not allowed");
    }
    if s.contains("..") {
        return Err("`..` is not allowed");
    }
    Ok(())
}

fn check_part(part: &str) -> Result<(), &'static str> {
    let Some(first) = part.chars().next() else {
        return Err("the org and name must not be empty");
    };
    if part.len() > MAX_PART {
        return Err("each part must be at most 96 characters");
    }
    if !first.is_ascii_alphanumeric() {
        return Err("each part must start with a letter or digit");
    }
    if part.contains("--") {
        return Err("`--` is reserved");
    }
    if !part.chars().all(is_name_char) {
        return Err("only letters, digits, `.`, `_` and `-` are allowed");
    }
    Ok(())
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// A commit id: exactly 40 lowercase hex digits.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Commit(String);

impl Commit {
    /// Validates a commit id sent by a server: 40 lowercase hex digits, nothing else.
    pub fn parse(value: &str) -> Result<Self, HubError> {
        if value.len() == 40 && value.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            Ok(Commit(value.to_owned()))
        } else {
            Err(HubError::BadCommit { value: shown(value) })
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Commit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A revision: a branch or tag name, or a pinned commit.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Revision {
    /// `[A-Za-z0-9._-]` with inner `/` (as in `refs/pr/1`), 1 to 128 characters.
    Branch(String),
    /// 40 hex digits (normalised to lowercase). The hub must answer for exactly this commit.
    Commit(Commit),
}

impl Revision {
    /// Parses a revision; 40 hex digits (any case) are taken as a commit.
    pub fn parse(revision: &str) -> Result<Self, HubError> {
        let bad = |reason| HubError::InvalidRevision { revision: shown(revision), reason };
        if revision.is_empty() {
            return Err(bad("empty"));
        }
        if revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(Revision::Commit(Commit(revision.to_ascii_lowercase())));
        }
        if revision.len() > MAX_REVISION {
            return Err(bad("longer than 128 characters"));
        }
        if revision.contains("://") {
            return Err(bad("looks like a URL"));
        }
        check_common(revision).map_err(bad)?;
        if revision.starts_with('/') {
            return Err(bad("must not start with `/`"));
        }
        if revision.ends_with('/') {
            return Err(bad("must not end with `/`"));
        }
        if revision.split('/').any(|seg| seg.is_empty()) {
            return Err(bad("empty path segment (`//`)"));
        }
        if revision.split('/').any(|seg| seg == ".") {
            return Err(bad("`.` segments are not allowed"));
        }
        if !revision.chars().all(|c| is_name_char(c) || c == '/') {
            return Err(bad("only letters, digits, `.`, `_`, `-` and inner `/` are allowed"));
        }
        Ok(Revision::Branch(revision.to_owned()))
    }

    /// The revision as one URL path segment: `/` escaped as `%2F`, as the hub expects.
    ///
    /// Every other allowed character is unreserved in URLs, so nothing else needs escaping.
    pub(crate) fn url_segment(&self) -> String {
        match self {
            Revision::Branch(b) => b.replace('/', "%2F"),
            Revision::Commit(c) => c.0.clone(),
        }
    }
}

impl Default for Revision {
    fn default() -> Self {
        Revision::Branch(DEFAULT_REVISION.to_owned())
    }
}

impl fmt::Display for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Revision::Branch(b) => f.write_str(b),
            Revision::Commit(c) => f.write_str(c.as_str()),
        }
    }
}

/// A model on the hub at a revision.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HubModel {
    pub id: HubId,
    pub revision: Revision,
}

impl HubModel {
    /// Parses an id and an optional revision (default `main`).
    pub fn parse(id: &str, revision: Option<&str>) -> Result<Self, HubError> {
        let id = HubId::parse(id)?;
        let revision = match revision {
            Some(r) => Revision::parse(r)?,
            None => Revision::default(),
        };
        Ok(HubModel { id, revision })
    }
}

/// A model already on this machine: a canonical path inside an allowed root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalModel {
    path: PathBuf,
}

impl LocalModel {
    /// Accepts `path` only if it is absolute, exists, and — with every symlink resolved — lies
    /// inside one of `allowed_roots` (which are canonicalised too; missing roots are skipped).
    ///
    /// Touches the filesystem (canonicalisation), so call it off the async hot path.
    pub fn parse(path: &Path, allowed_roots: &[PathBuf]) -> Result<Self, HubError> {
        if !path.is_absolute() {
            return Err(HubError::LocalPathNotAbsolute { path: path.to_owned() });
        }
        let canonical = std::fs::canonicalize(path)
            .map_err(|_| HubError::LocalPathNotFound { path: path.to_owned() })?;
        let inside = allowed_roots
            .iter()
            .any(|root| std::fs::canonicalize(root).is_ok_and(|root| canonical.starts_with(&root)));
        if !inside {
            return Err(HubError::LocalPathForbidden { path: path.to_owned() });
        }
        Ok(LocalModel { path: canonical })
    }

    /// The canonical path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// What `POST /v1/models/load` names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelRef {
    Hub(HubModel),
    Local(LocalModel),
}

impl ModelRef {
    /// Parses a reference: an absolute path (starting with `/`) is a local model and takes no
    /// revision; anything else is a hub id with an optional revision.
    pub fn parse(
        reference: &str,
        revision: Option<&str>,
        allowed_roots: &[PathBuf],
    ) -> Result<Self, HubError> {
        if reference.starts_with('/') {
            if let Some(r) = revision {
                return Err(HubError::InvalidRevision {
                    revision: shown(r),
                    reason: "a local path takes no revision",
                });
            }
            return Ok(ModelRef::Local(LocalModel::parse(Path::new(reference), allowed_roots)?));
        }
        if reference.starts_with("./") || reference.starts_with("../") || reference.starts_with('~')
        {
            return Err(HubError::LocalPathNotAbsolute { path: PathBuf::from(reference) });
        }
        Ok(ModelRef::Hub(HubModel::parse(reference, revision)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id_reason(id: &str) -> &'static str {
        match HubId::parse(id) {
            Err(HubError::InvalidModelId { reason, .. }) => reason,
            other => panic!("{id:?} was accepted: {other:?}"),
        }
    }

    fn rev_reason(rev: &str) -> &'static str {
        match Revision::parse(rev) {
            Err(HubError::InvalidRevision { reason, .. }) => reason,
            other => panic!("{rev:?} was accepted: {other:?}"),
        }
    }

    #[test]
    fn good_ids() {
        let id = HubId::parse("HuggingFaceTB/SmolLM2-135M-Instruct").unwrap();
        assert_eq!(id.org(), Some("HuggingFaceTB"));
        assert_eq!(id.name(), "SmolLM2-135M-Instruct");
        assert_eq!(id.to_string(), "HuggingFaceTB/SmolLM2-135M-Instruct");
        assert_eq!(id.dir_name(), "HuggingFaceTB--SmolLM2-135M-Instruct");
        let id = HubId::parse("gpt2").unwrap();
        assert_eq!(id.dir_name(), "gpt2");
        assert!(HubId::parse("a.b_c-d/e.f").is_ok());
        assert!(HubId::parse(&format!("o/{}", "n".repeat(96))).is_ok());
    }

    #[test]
    fn bad_ids_name_the_rule() {
        assert_eq!(id_reason(""), "empty");
        assert!(id_reason("https://huggingface.co/org/name").contains("URL"));
        assert!(id_reason("org/na%2Fme").contains("percent"));
        assert!(id_reason("org%2F..%2Fetc").contains("percent"));
        assert!(id_reason("org\\name").contains("backslash"));
        assert!(id_reason("org/na me").contains("whitespace"));
        assert!(id_reason("org/name\n").contains("control"));
        assert!(id_reason("org/\u{0}name").contains("control"));
        assert!(id_reason("org/..").contains(".."));
        assert!(id_reason("../etc/passwd").contains(".."));
        assert!(id_reason("org/a..b").contains(".."));
        assert!(id_reason("a/b/c").contains("at most one"));
        assert!(id_reason("org/").contains("empty"));
        assert!(id_reason("/name").contains("empty"));
        assert!(id_reason("org/.hidden").contains("start with"));
        assert!(id_reason("org/-dash").contains("start with"));
        assert!(id_reason("org/a--b").contains("reserved"));
        assert!(id_reason("org/naïve").contains("only letters"));
        assert!(id_reason("org/na:me").contains("only letters"));
        assert!(id_reason("org/na?me").contains("only letters"));
        assert!(id_reason("org/name#frag").contains("only letters"));
        assert!(id_reason(&format!("o/{}", "n".repeat(97))).contains("96"));
    }

    #[test]
    fn revisions() {
        assert_eq!(Revision::default().to_string(), "main");
        assert_eq!(Revision::parse("v1.0").unwrap(), Revision::Branch("v1.0".into()));
        let pr = Revision::parse("refs/pr/1").unwrap();
        assert_eq!(pr.url_segment(), "refs%2Fpr%2F1");
        let upper = "0123456789ABCDEF0123456789abcdef01234567";
        match Revision::parse(upper).unwrap() {
            Revision::Commit(c) => assert_eq!(c.as_str(), upper.to_ascii_lowercase()),
            other => panic!("not a commit: {other:?}"),
        }
    }

    #[test]
    fn bad_revisions_name_the_rule() {
        assert_eq!(rev_reason(""), "empty");
        assert!(rev_reason("../../etc").contains(".."));
        assert!(rev_reason("main/../../x").contains(".."));
        assert!(rev_reason("/main").contains("start"));
        assert!(rev_reason("main/").contains("end"));
        assert!(rev_reason("a//b").contains("empty"));
        assert!(rev_reason("a/./b").contains("`.`"));
        assert!(rev_reason("%2e%2e").contains("percent"));
        assert!(rev_reason("http://evil").contains("URL"));
        assert!(rev_reason("ma in").contains("whitespace"));
        assert!(rev_reason("main\r\nX-Evil: 1").contains("control"));
        assert!(rev_reason("a\\b").contains("backslash"));
        assert!(rev_reason("main?x=1").contains("only letters"));
        assert!(rev_reason(&"a".repeat(129)).contains("128"));
    }

    #[test]
    fn model_refs() {
        let r = ModelRef::parse("org/name", Some("v2"), &[]).unwrap();
        assert_eq!(
            r,
            ModelRef::Hub(HubModel {
                id: HubId::parse("org/name").unwrap(),
                revision: Revision::Branch("v2".into())
            })
        );
        assert!(matches!(
            ModelRef::parse("./models/x", None, &[]),
            Err(HubError::LocalPathNotAbsolute { .. })
        ));
        assert!(matches!(
            ModelRef::parse("/tmp", Some("main"), &[]),
            Err(HubError::InvalidRevision { .. })
        ));
    }

    #[cfg(unix)]
    #[test]
    fn local_paths_stay_inside_the_roots() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let model = root.path().join("m");
        std::fs::create_dir(&model).unwrap();
        let roots = vec![root.path().to_owned()];

        let ok = LocalModel::parse(&model, &roots).unwrap();
        assert_eq!(ok.path(), std::fs::canonicalize(&model).unwrap());

        // A symlink inside the root pointing outside is an escape.
        let link = root.path().join("escape");
        std::os::unix::fs::symlink(outside.path(), &link).unwrap();
        assert!(matches!(
            LocalModel::parse(&link, &roots),
            Err(HubError::LocalPathForbidden { .. })
        ));
        // So is `..` out of the root.
        let dotdot = model.join("..").join("..");
        assert!(matches!(
            LocalModel::parse(&dotdot, &roots),
            Err(HubError::LocalPathForbidden { .. })
        ));
        assert!(matches!(
            LocalModel::parse(outside.path(), &roots),
            Err(HubError::LocalPathForbidden { .. })
        ));
        assert!(matches!(
            LocalModel::parse(&root.path().join("missing"), &roots),
            Err(HubError::LocalPathNotFound { .. })
        ));
        assert!(matches!(
            LocalModel::parse(Path::new("relative/x"), &roots),
            Err(HubError::LocalPathNotAbsolute { .. })
        ));
        // No roots configured: nothing local is allowed.
        assert!(matches!(LocalModel::parse(&model, &[]), Err(HubError::LocalPathForbidden { .. })));
    }
}
