//! What a model hub says about a repository, validated by `edgeroute_hub` before anything
//! touches the filesystem: the repository info JSON (`Manifest::from_repo_info`: commit id,
//! file names, sizes, LFS hashes) and the names around it (model ids, revisions, filters,
//! repository paths).
//!
//! Input: three lines (model id, revision, comma-separated filter patterns; each falls back to
//! a valid default when it does not parse), then the response body.
//!
//! Properties: nothing panics; an accepted manifest lists unique, sorted, safe paths (each one
//! `RepoPath::parse` accepts, joined onto a directory stays inside it), sizes within the limit
//! that do not overflow, lowercase 64-hex hashes, the commit the revision pinned, and a loadable
//! layout.

#![no_main]

use std::path::{Component, Path};

use edgeroute_hub::{Commit, FileFilter, HubId, Manifest, RepoPath, Revision, layout_problem};
use libfuzzer_sys::fuzz_target;

const MAX_FILE: u64 = 1 << 40;

fn split_line(b: &[u8]) -> (&[u8], &[u8]) {
    match b.iter().position(|&c| c == b'\n') {
        Some(i) => (&b[..i], &b[i + 1..]),
        None => (b, &[]),
    }
}

fn safe(path: &str) -> bool {
    Path::new(path).components().all(|c| matches!(c, Component::Normal(_)))
}

fuzz_target!(|data: &[u8]| {
    let (id, rest) = split_line(data);
    let (revision, rest) = split_line(rest);
    let (patterns, body) = split_line(rest);
    let id = String::from_utf8_lossy(id);
    let revision = String::from_utf8_lossy(revision);
    let patterns = String::from_utf8_lossy(patterns);

    let id = HubId::parse(&id).unwrap_or_else(|_| HubId::parse("org/model").expect("valid"));
    let revision = Revision::parse(&revision).unwrap_or(Revision::Branch("main".into()));
    let filter = FileFilter::new(patterns.split(',')).unwrap_or_default();
    // Every line of the body is also a candidate repository path or commit id.
    for line in String::from_utf8_lossy(body).lines() {
        if let Ok(p) = RepoPath::parse(line) {
            assert!(safe(p.as_str()), "RepoPath accepted {line:?}");
            let _ = filter.matches(p.as_str());
        }
        if let Ok(c) = Commit::parse(line) {
            assert_eq!(c.as_str(), line);
        }
    }

    let Ok(m) = Manifest::from_repo_info(&id, &revision, body, &filter, MAX_FILE) else {
        return;
    };
    assert_eq!(m.id, id);
    if let Revision::Commit(c) = &revision {
        assert_eq!(&m.commit, c, "the hub answered for another commit");
    }
    assert!(m.files.windows(2).all(|w| w[0].path < w[1].path), "unsorted or duplicate paths");
    let mut total = 0u64;
    for f in &m.files {
        assert_eq!(RepoPath::parse(f.path.as_str()).ok().as_ref(), Some(&f.path));
        assert!(safe(f.path.as_str()), "unsafe path {:?}", f.path);
        assert!(filter.matches(f.path.as_str()));
        assert!(f.size <= MAX_FILE);
        total = total.checked_add(f.size).expect("sizes overflow");
        if let Some(h) = &f.sha256 {
            assert!(h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
        }
    }
    assert_eq!(m.total_bytes(), total);
    assert_eq!(layout_problem(m.files.iter().map(|f| f.path.as_str())), None);
});
