//! Which files of a repository to download: glob patterns, pickle refusal, and the check that
//! a selection is loadable at all.
//!
//! A pattern without `/` matches a file's name in any directory; a pattern with `/` matches
//! the whole path. `*` matches any run of characters except `/`, `?` one character except
//! `/`; everything else is literal. No `**`, no character classes: the patterns are short
//! lists written by operators, and a tiny matcher is easy to trust.

use serde::{Deserialize, Serialize};

use crate::error::{HubError, shown};

/// What [`FileFilter::default`] selects: safetensors weights and their index, configuration
/// and tokenizer files, chat templates, and GGUF files.
///
/// A GGUF repository often holds many quantisations of one model: name the one you want
/// (`FileFilter::new(["model.Q4_K_M.gguf"])`) rather than downloading all of them.
pub const DEFAULT_PATTERNS: &[&str] =
    &["*.safetensors", "*.json", "*.txt", "tokenizer.*", "*.jinja", "*.gguf"];

/// Extensions of pickle-based formats, which execute code when loaded. Never downloaded.
const PICKLE_EXTENSIONS: &[&str] = &["bin", "pt", "pth", "pkl", "ckpt", "pickle", "joblib"];

/// Longest pattern accepted.
const MAX_PATTERN: usize = 256;
/// Most patterns accepted.
const MAX_PATTERNS: usize = 64;

/// A validated list of glob patterns; a file is selected if any pattern matches it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<String>", into = "Vec<String>")]
pub struct FileFilter {
    patterns: Vec<String>,
}

impl FileFilter {
    /// Validates patterns: non-empty, at most 256 characters of `[A-Za-z0-9._/*?-]`, no `..`,
    /// no leading `/`.
    pub fn new<I, S>(patterns: I) -> Result<Self, HubError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let patterns: Vec<String> = patterns.into_iter().map(Into::into).collect();
        if patterns.is_empty() {
            return Err(HubError::InvalidFilter {
                pattern: String::new(),
                reason: "give at least one pattern",
            });
        }
        if patterns.len() > MAX_PATTERNS {
            return Err(HubError::InvalidFilter {
                pattern: String::new(),
                reason: "at most 64 patterns",
            });
        }
        for p in &patterns {
            let bad = |reason| HubError::InvalidFilter { pattern: shown(p), reason };
            if p.is_empty() {
                return Err(bad("empty pattern"));
            }
            if p.len() > MAX_PATTERN {
                return Err(bad("longer than 256 characters"));
            }
            if p.contains("..") {
                return Err(bad("`..` is not allowed"));
            }
            if p.starts_with('/') {
                return Err(bad("patterns are relative to the repository; no leading `/`"));
            }
            if !p.chars().all(|c| {
                c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/' | '*' | '?')
            }) {
                return Err(bad("only letters, digits, `.`, `_`, `-`, `/`, `*` and `?`"));
            }
        }
        Ok(FileFilter { patterns })
    }

    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }

    /// True if any pattern matches `path` (a repository-relative path with `/` separators).
    pub fn matches(&self, path: &str) -> bool {
        let name = path.rsplit('/').next().unwrap_or(path);
        self.patterns.iter().any(|p| {
            let subject = if p.contains('/') { path } else { name };
            glob_match(p.as_bytes(), subject.as_bytes())
        })
    }
}

impl Default for FileFilter {
    fn default() -> Self {
        FileFilter { patterns: DEFAULT_PATTERNS.iter().map(|p| (*p).to_owned()).collect() }
    }
}

impl TryFrom<Vec<String>> for FileFilter {
    type Error = HubError;
    fn try_from(v: Vec<String>) -> Result<Self, HubError> {
        FileFilter::new(v)
    }
}

impl From<FileFilter> for Vec<String> {
    fn from(f: FileFilter) -> Self {
        f.patterns
    }
}

/// Glob match with `*` and `?`, neither crossing `/`. Iterative with one backtrack point,
/// so it is linear-ish and cannot blow up on hostile names.
fn glob_match(pattern: &[u8], subject: &[u8]) -> bool {
    let (mut p, mut s) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while s < subject.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, s));
                p += 1;
            }
            Some(&c) if (c == b'?' && subject[s] != b'/') || c == subject[s] => {
                p += 1;
                s += 1;
            }
            _ => match star {
                // Let the last `*` swallow one more character, unless that is a `/`.
                Some((sp, ss)) if subject[ss] != b'/' => {
                    p = sp + 1;
                    s = ss + 1;
                    star = Some((sp, ss + 1));
                }
                _ => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

fn extension(path: &str) -> Option<String> {
    let name = path.rsplit('/').next().unwrap_or(path);
    name.rsplit_once('.').map(|(_, ext)| ext.to_ascii_lowercase())
}

/// True for pickle-based formats (by extension, case-insensitive).
pub fn is_pickle(path: &str) -> bool {
    extension(path).is_some_and(|e| PICKLE_EXTENSIONS.contains(&e.as_str()))
}

/// True for weights this project loads: `.safetensors`, `.gguf` and `.onnx` (a protobuf graph:
/// data an ONNX runtime interprets, never code it imports, unlike a pickle).
pub fn is_safe_weights(path: &str) -> bool {
    extension(path).is_some_and(|e| e == "safetensors" || e == "gguf" || e == "onnx")
}

/// Why a set of repository paths is not a loadable model, if it is not: it needs a `.gguf`, an
/// `.onnx` graph (for Triton's ONNX Runtime backend), or a top-level `config.json` plus at
/// least one `.safetensors`. Which backend can serve the selection is the node's question.
pub fn layout_problem<'a>(paths: impl IntoIterator<Item = &'a str>) -> Option<String> {
    let (mut single_file, mut config, mut safetensors) = (false, false, false);
    for p in paths {
        match extension(p).as_deref() {
            Some("gguf" | "onnx") => single_file = true,
            Some("safetensors") => safetensors = true,
            _ => {}
        }
        config |= p == "config.json";
    }
    match (single_file, config, safetensors) {
        (true, _, _) | (false, true, true) => None,
        (false, false, true) => Some("safetensors weights but no config.json".into()),
        (false, true, false) => Some("config.json but no .safetensors weights".into()),
        (false, false, false) => Some(
            "neither a .gguf file, an .onnx file, nor config.json + .safetensors (name the \
             files to fetch with `files`)"
                .into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_selection() {
        let f = FileFilter::default();
        for yes in [
            "model.safetensors",
            "model-00001-of-00002.safetensors",
            "model.safetensors.index.json",
            "config.json",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer.model",
            "merges.txt",
            "chat_template.jinja",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "onnx/config.json",
        ] {
            assert!(f.matches(yes), "{yes} should be selected");
        }
        for no in ["pytorch_model.bin", "README.md", ".gitattributes", "model.onnx", "x.pt"] {
            assert!(!f.matches(no), "{no} should not be selected");
        }
    }

    #[test]
    fn glob_semantics() {
        let f = FileFilter::new(["*.Q4_1.gguf"]).unwrap();
        assert!(f.matches("SmolLM2-135M-Instruct.Q4_1.gguf"));
        assert!(f.matches("sub/x.Q4_1.gguf"), "patterns without / match the file name");
        assert!(!f.matches("x.Q8_0.gguf"));
        let f = FileFilter::new(["onnx/*.json"]).unwrap();
        assert!(f.matches("onnx/config.json"));
        assert!(!f.matches("config.json"));
        assert!(!f.matches("onnx/deep/config.json"), "* does not cross /");
        let f = FileFilter::new(["model-0000?-of-00002.safetensors"]).unwrap();
        assert!(f.matches("model-00001-of-00002.safetensors"));
        assert!(!f.matches("model-00001-of-00003.safetensors"));
        let f = FileFilter::new(["exact.gguf"]).unwrap();
        assert!(f.matches("exact.gguf"));
        assert!(!f.matches("exact.gguff"));
        assert!(glob_match(b"a*b*c", b"aXXbYYc"));
        assert!(!glob_match(b"a*b*c", b"aXXbYY"));
        assert!(glob_match(b"*", b""));
        // Pathological input stays fast.
        let long = "a".repeat(10_000);
        assert!(!glob_match(b"*a*a*a*a*a*a*b", long.as_bytes()));
    }

    #[test]
    fn bad_patterns() {
        for (p, why) in [
            ("", "empty"),
            ("../x", ".."),
            ("/etc/passwd", "leading"),
            ("a b", "only"),
            ("[ab].gguf", "only"),
        ] {
            match FileFilter::new([p]) {
                Err(HubError::InvalidFilter { reason, .. }) => assert!(reason.contains(why), "{p}"),
                other => panic!("{p:?} accepted: {other:?}"),
            }
        }
        assert!(FileFilter::new(Vec::<String>::new()).is_err());
        let parsed: Result<FileFilter, _> = serde_json::from_str(r#"["../x"]"#);
        assert!(parsed.is_err(), "serde goes through validation");
    }

    #[test]
    fn pickles_and_layouts() {
        for p in ["pytorch_model.bin", "x.PT", "a/b.pth", "m.ckpt", "d.pkl", "e.pickle"] {
            assert!(is_pickle(p), "{p}");
        }
        assert!(!is_pickle("model.safetensors"));
        assert!(!is_pickle("binary"));
        assert!(layout_problem(["m.gguf"]).is_none());
        assert!(layout_problem(["onnx/model.onnx"]).is_none());
        assert!(is_safe_weights("onnx/model.onnx") && !is_safe_weights("model.onnx_data"));
        assert!(layout_problem(["config.json", "model.safetensors"]).is_none());
        assert!(layout_problem(["model.safetensors"]).unwrap().contains("config.json"));
        assert!(layout_problem(["config.json"]).unwrap().contains("safetensors"));
        assert!(layout_problem(["sub/config.json", "model.safetensors"]).is_some());
        assert!(layout_problem([]).is_some());
    }
}
