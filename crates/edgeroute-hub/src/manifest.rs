//! The list of files to download for one model at one commit, built from the hub's answer with
//! every server-supplied value validated before anything touches the filesystem.
//!
//! This module is pure: it turns parsed JSON into a [`Manifest`] or a precise error. A server
//! that lists a path which could escape the model directory (`..`, absolute, backslash, empty
//! or `.` segments, control characters, duplicates, file/directory clashes) is treated as
//! hostile: the whole answer is refused, not just that file.

use std::collections::BTreeSet;
use std::fmt;

use serde::Deserialize;

use crate::error::{HubError, shown};
use crate::filter::{FileFilter, is_pickle, is_safe_weights, layout_problem};
use crate::model_ref::{Commit, HubId, Revision};

/// Longest repository path accepted (bytes).
const MAX_PATH: usize = 512;
/// Longest path component (a common filesystem limit).
const MAX_COMPONENT: usize = 255;
/// Deepest directory nesting accepted.
const MAX_DEPTH: usize = 16;
/// Most files a repository listing may hold.
pub(crate) const MAX_SIBLINGS: usize = 10_000;

/// A validated repository-relative path: 1–16 components of `[A-Za-z0-9._-]+`, none `.` or
/// `..`, joined by `/`, at most 512 bytes. Safe to join onto a directory.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoPath(String);

/// Why a server-supplied path was refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct PathProblem {
    pub reason: &'static str,
    /// True if the name could escape or confuse the target directory (as opposed to merely
    /// using characters this installer does not support).
    pub hostile: bool,
}

impl RepoPath {
    /// Validates a path as listed by the hub.
    pub fn parse(path: &str) -> Result<Self, HubError> {
        Self::check(path).map_err(|p| HubError::UnsafePath { path: shown(path), reason: p.reason })
    }

    pub(crate) fn check(path: &str) -> Result<Self, PathProblem> {
        let hostile = |reason| Err(PathProblem { reason, hostile: true });
        if path.is_empty() {
            return hostile("empty path");
        }
        if path.len() > MAX_PATH {
            return hostile("longer than 512 bytes");
        }
        if path.chars().any(char::is_control) {
            return hostile("control character");
        }
        if path.contains('\\') {
            return hostile("backslash");
        }
        if path.starts_with('/') {
            return hostile("absolute path");
        }
        let mut depth = 0;
        for comp in path.split('/') {
            depth += 1;
            match comp {
                "" => return hostile("empty path segment"),
                "." | ".." => return hostile("`.` or `..` segment"),
                c if c.len() > MAX_COMPONENT => return hostile("segment longer than 255 bytes"),
                _ => {}
            }
        }
        if depth > MAX_DEPTH {
            return hostile("nested deeper than 16 directories");
        }
        if !path.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/')) {
            return Err(PathProblem {
                reason: "characters outside [A-Za-z0-9._-] are not supported",
                hostile: false,
            });
        }
        Ok(RepoPath(path.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RepoPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One file to download.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileEntry {
    pub path: RepoPath,
    /// Size in bytes, as announced by the hub; the download must match it exactly.
    pub size: u64,
    /// Lowercase hex SHA-256, announced for LFS files (weights); verified after download.
    pub sha256: Option<String>,
}

/// What to download for one model at one resolved commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub id: HubId,
    pub commit: Commit,
    /// Selected files, sorted by path.
    pub files: Vec<FileEntry>,
}

impl Manifest {
    /// Parses and validates the hub's answer to
    /// `GET /api/models/{id}/revision/{rev}?blobs=true` (the raw body, as received) and selects
    /// the files `filter` asks for, refusing any file over `max_file_bytes`.
    pub fn from_repo_info(
        id: &HubId,
        revision: &Revision,
        body: &[u8],
        filter: &FileFilter,
        max_file_bytes: u64,
    ) -> Result<Manifest, HubError> {
        let info: RepoInfo = serde_json::from_slice(body).map_err(|e| HubError::BadResponse {
            what: shown(&format!("repository info is not the expected JSON: {e}")),
        })?;
        build(id, revision, info, filter, max_file_bytes)
    }

    /// Sum of the file sizes.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// The part of `GET /api/models/{id}/revision/{rev}?blobs=true` this crate reads. Unknown
/// fields are ignored: this is someone else's schema.
#[derive(Debug, Deserialize)]
pub(crate) struct RepoInfo {
    pub sha: Option<String>,
    pub siblings: Option<Vec<Sibling>>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Sibling {
    pub rfilename: String,
    pub size: Option<u64>,
    pub lfs: Option<Lfs>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Lfs {
    pub sha256: Option<String>,
    pub size: Option<u64>,
}

/// Validates the hub's answer and selects the files to download.
pub(crate) fn build(
    id: &HubId,
    revision: &Revision,
    info: RepoInfo,
    filter: &FileFilter,
    max_file_bytes: u64,
) -> Result<Manifest, HubError> {
    let sha = info.sha.ok_or_else(|| bad("the answer has no commit id (`sha`)"))?;
    let commit = Commit::parse(&sha)?;
    if let Revision::Commit(asked) = revision
        && *asked != commit
    {
        return Err(HubError::CommitMismatch {
            requested: asked.to_string(),
            got: commit.to_string(),
        });
    }
    let siblings = info.siblings.ok_or_else(|| bad("the answer has no file list (`siblings`)"))?;
    if siblings.len() > MAX_SIBLINGS {
        return Err(bad(&format!("the repository lists more than {MAX_SIBLINGS} files")));
    }

    // Every listed name is checked, selected or not: a server that lists a traversal name is
    // not trusted for anything else either.
    let mut seen = BTreeSet::new();
    for s in &siblings {
        if let Err(p) = RepoPath::check(&s.rfilename)
            && p.hostile
        {
            return Err(HubError::UnsafePath { path: shown(&s.rfilename), reason: p.reason });
        }
        if !seen.insert(s.rfilename.as_str()) {
            return Err(HubError::UnsafePath { path: shown(&s.rfilename), reason: "listed twice" });
        }
    }
    // A name that is also a directory prefix of another name cannot be both on disk. `seen`
    // is sorted, so a clashing `a/...` follows `a` and its successor reveals it.
    for name in &seen {
        let prefix = format!("{name}/");
        if seen.range(prefix.as_str()..).next().is_some_and(|n| n.starts_with(&prefix)) {
            return Err(HubError::UnsafePath {
                path: shown(name),
                reason: "is both a file and a directory",
            });
        }
    }

    let pickles: Vec<&str> =
        siblings.iter().map(|s| s.rfilename.as_str()).filter(|n| is_pickle(n)).collect();
    if !pickles.is_empty() && !siblings.iter().any(|s| is_safe_weights(&s.rfilename)) {
        let mut files = pickles.iter().take(5).copied().collect::<Vec<_>>().join(", ");
        if pickles.len() > 5 {
            files.push_str(", …");
        }
        return Err(HubError::PickleRefused { id: id.to_string(), files: shown(&files) });
    }

    let mut files = Vec::new();
    for s in siblings {
        if !filter.matches(&s.rfilename) || is_pickle(&s.rfilename) {
            continue;
        }
        // Hostile names were refused above; what is left is an unsupported character in a
        // file the operator asked for, which is still a refusal.
        let path = RepoPath::parse(&s.rfilename)?;
        let size = s.size.ok_or_else(|| bad(&format!("no size for {path}")))?;
        let mut sha256 = None;
        if let Some(lfs) = s.lfs {
            if let Some(lfs_size) = lfs.size
                && lfs_size != size
            {
                return Err(HubError::SizeMismatch {
                    path: path.to_string(),
                    expected: size,
                    got: lfs_size,
                });
            }
            if let Some(h) = lfs.sha256 {
                sha256 = Some(parse_sha256(&path, &h)?);
            }
        }
        if size > max_file_bytes {
            return Err(HubError::FileTooLarge {
                path: path.to_string(),
                size,
                max: max_file_bytes,
            });
        }
        files.push(FileEntry { path, size, sha256 });
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    if files.iter().try_fold(0u64, |acc, f| acc.checked_add(f.size)).is_none() {
        return Err(bad("file sizes overflow"));
    }
    if let Some(reason) = layout_problem(files.iter().map(|f| f.path.as_str())) {
        return Err(HubError::NoLoadableWeights { id: id.to_string(), reason });
    }
    Ok(Manifest { id: id.clone(), commit, files })
}

/// A SHA-256 in hex (either case), normalised to lowercase.
fn parse_sha256(path: &RepoPath, value: &str) -> Result<String, HubError> {
    if value.len() == 64 && value.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(value.to_ascii_lowercase())
    } else {
        Err(HubError::BadHash { path: path.to_string(), value: shown(value) })
    }
}

fn bad(what: &str) -> HubError {
    HubError::BadResponse { what: what.to_owned() }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
    const SHA: &str = "a3f1c3a1b2c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e";

    fn info(siblings: serde_json::Value) -> RepoInfo {
        serde_json::from_value(serde_json::json!({ "sha": COMMIT, "siblings": siblings })).unwrap()
    }

    fn run(siblings: serde_json::Value) -> Result<Manifest, HubError> {
        build(
            &HubId::parse("org/m").unwrap(),
            &Revision::default(),
            info(siblings),
            &FileFilter::default(),
            1 << 30,
        )
    }

    fn gguf() -> serde_json::Value {
        serde_json::json!({"rfilename": "m.gguf", "size": 10, "lfs": {"sha256": SHA, "size": 10}})
    }

    #[test]
    fn selects_and_validates() {
        let m = run(serde_json::json!([
            gguf(),
            {"rfilename": "README.md", "size": 5},
            {"rfilename": "config.json", "size": 7},
            {"rfilename": ".gitattributes", "size": 1},
            {"rfilename": "pytorch_model.bin", "size": 9, "lfs": {"sha256": SHA, "size": 9}},
            {"rfilename": "images/Screen Shot.png", "size": 3},
        ]))
        .unwrap();
        let names: Vec<_> = m.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(names, ["config.json", "m.gguf"]);
        assert_eq!(m.files[1].sha256.as_deref(), Some(SHA));
        assert_eq!(m.files[0].sha256, None);
        assert_eq!(m.total_bytes(), 17);
        assert_eq!(m.commit.as_str(), COMMIT);
    }

    #[test]
    fn hostile_names_refuse_the_whole_answer() {
        for name in [
            "../../etc/passwd",
            "a/../../b",
            "/etc/passwd",
            "a\\..\\b",
            "a//b",
            "./a",
            "a/.",
            "",
            "a\u{0}b",
            "dir/\n.gguf",
        ] {
            let err = run(serde_json::json!([gguf(), {"rfilename": name, "size": 1}])).unwrap_err();
            assert!(matches!(err, HubError::UnsafePath { .. }), "{name:?}: {err}");
        }
        let deep = vec!["d"; 17].join("/");
        assert!(matches!(
            run(serde_json::json!([gguf(), {"rfilename": deep, "size": 1}])),
            Err(HubError::UnsafePath { .. })
        ));
        assert!(matches!(
            run(serde_json::json!([gguf(), gguf()])),
            Err(HubError::UnsafePath { reason: "listed twice", .. })
        ));
        assert!(matches!(
            run(serde_json::json!([gguf(), {"rfilename": "m.gguf/x", "size": 1}])),
            Err(HubError::UnsafePath { reason: "is both a file and a directory", .. })
        ));
    }

    #[test]
    fn unsupported_characters_only_matter_when_selected() {
        let err =
            run(serde_json::json!([gguf(), {"rfilename": "tok en.json", "size": 1}])).unwrap_err();
        assert!(matches!(err, HubError::UnsafePath { .. }), "{err}");
    }

    #[test]
    fn bad_commit_and_mismatch() {
        for sha in ["main", "0123", &COMMIT.to_uppercase(), &format!("{COMMIT}0"), "../x"] {
            let info: RepoInfo =
                serde_json::from_value(serde_json::json!({"sha": sha, "siblings": [gguf()]}))
                    .unwrap();
            let err = build(
                &HubId::parse("m").unwrap(),
                &Revision::default(),
                info,
                &FileFilter::default(),
                100,
            )
            .unwrap_err();
            assert!(matches!(err, HubError::BadCommit { .. }), "{sha}: {err}");
        }
        let other = "f".repeat(40);
        let err = build(
            &HubId::parse("m").unwrap(),
            &Revision::parse(&other).unwrap(),
            info(serde_json::json!([gguf()])),
            &FileFilter::default(),
            100,
        )
        .unwrap_err();
        assert!(matches!(err, HubError::CommitMismatch { .. }), "{err}");
    }

    #[test]
    fn hashes_and_sizes() {
        let err = run(serde_json::json!([
            {"rfilename": "m.gguf", "size": 10, "lfs": {"sha256": "zz", "size": 10}}
        ]))
        .unwrap_err();
        assert!(matches!(err, HubError::BadHash { .. }), "{err}");
        let err = run(serde_json::json!([
            {"rfilename": "m.gguf", "size": 10, "lfs": {"sha256": SHA, "size": 11}}
        ]))
        .unwrap_err();
        assert!(matches!(err, HubError::SizeMismatch { .. }), "{err}");
        let err = build(
            &HubId::parse("m").unwrap(),
            &Revision::default(),
            info(serde_json::json!([gguf()])),
            &FileFilter::default(),
            9,
        )
        .unwrap_err();
        assert!(matches!(err, HubError::FileTooLarge { size: 10, max: 9, .. }), "{err}");
        let err = run(serde_json::json!([{"rfilename": "m.gguf"}])).unwrap_err();
        assert!(matches!(err, HubError::BadResponse { .. }), "{err}");
    }

    #[test]
    fn pickles() {
        let err = run(serde_json::json!([
            {"rfilename": "config.json", "size": 1},
            {"rfilename": "pytorch_model.bin", "size": 9},
        ]))
        .unwrap_err();
        assert!(matches!(err, HubError::PickleRefused { .. }), "{err}");
        assert!(err.to_string().contains("pytorch_model.bin"));
        // With safetensors present, the pickle is skipped instead.
        let m = run(serde_json::json!([
            {"rfilename": "config.json", "size": 1},
            {"rfilename": "pytorch_model.bin", "size": 9},
            {"rfilename": "model.safetensors", "size": 9},
        ]))
        .unwrap();
        assert_eq!(m.files.len(), 2);
        // A filter that names the pickle still does not get it.
        let err = build(
            &HubId::parse("m").unwrap(),
            &Revision::default(),
            info(serde_json::json!([
                {"rfilename": "config.json", "size": 1},
                {"rfilename": "pytorch_model.bin", "size": 9},
                {"rfilename": "model.safetensors", "size": 9},
            ])),
            &FileFilter::new(["*.bin", "config.json"]).unwrap(),
            100,
        )
        .unwrap_err();
        assert!(matches!(err, HubError::NoLoadableWeights { .. }), "{err}");
    }

    proptest::proptest! {
        /// Whatever the server sends, an accepted path joins onto a directory as plain names
        /// only: no root, no `..`, no `.`, no prefix.
        #[test]
        fn accepted_paths_never_escape(s in "[a-z./\\\\:-]{0,24}|\\PC{0,24}") {
            if let Ok(p) = RepoPath::parse(&s) {
                for c in std::path::Path::new(p.as_str()).components() {
                    proptest::prop_assert!(matches!(c, std::path::Component::Normal(_)), "{s:?}");
                }
                proptest::prop_assert!(!p.as_str().contains('\\'));
            }
        }

        /// Accepted ids give one plain directory name that maps back to the same id.
        #[test]
        fn accepted_ids_make_safe_directory_names(s in "[A-Za-z0-9./_%-]{0,24}|\\PC{0,24}") {
            if let Ok(id) = HubId::parse(&s) {
                let dir = id.dir_name();
                proptest::prop_assert!(!dir.contains('/') && !dir.contains(".."), "{s:?}");
                proptest::prop_assert!(!dir.starts_with('.'), "{s:?}");
                proptest::prop_assert_eq!(id.to_string(), s);
            }
        }
    }

    #[test]
    fn nothing_loadable() {
        let err = run(serde_json::json!([{"rfilename": "README.md", "size": 1}])).unwrap_err();
        assert!(matches!(err, HubError::NoLoadableWeights { .. }), "{err}");
        let info = serde_json::from_value::<RepoInfo>(
            serde_json::json!({"sha": COMMIT, "siblings": {"not": "a list"}}),
        );
        assert!(info.is_err());
    }
}
