//! Converting an installed Hugging Face snapshot into an entry of NVIDIA Triton's model
//! repository: `<name>/config.pbtxt` and the version directory `<name>/1/`.
//!
//! The decision is pure: [`classify`] reads file names only (so a load can be refused before
//! anything is downloaded), [`plan_entry`] takes the snapshot's file list and `config.json`'s
//! bytes and returns the [`Entry`] to write, or a [`ConvertError`] naming why there is none.
//! [`write_entry`] then lays the entry out in a staging directory (the weights hard-linked from
//! the install, copied only where a link is impossible), seals it, and renames it into the
//! repository: a conversion that fails at any step leaves nothing there.
//!
//! ```text
//! transformer checkpoint (config.json + *.safetensors) → Triton's vLLM backend
//!   <name>/config.pbtxt       backend "vllm", decoupled, one KIND_GPU instance on device N
//!   <name>/1/model.json       vLLM's engine arguments: the weights' path as Triton sees it,
//!                             load_format "safetensors"
//!   <name>/1/weights/…        the snapshot's files, under their repository paths
//! one .onnx graph → Triton's ONNX Runtime backend
//!   <name>/config.pbtxt       backend "onnxruntime", one KIND_GPU instance on device N
//!   <name>/1/model.onnx       the graph
//!   <name>/1/<name>.onnx_data its external tensor data, if any, under the name the graph records
//! ```
//!
//! GGUF files have no Triton backend here (serve them with llama.cpp as an OpenAI-compatible
//! upstream), and pickled checkpoints (`pytorch_model.bin`) are never downloaded at all.
//!
//! Not here: talking to Triton (`backend/triton.rs`), copying the entry to Triton's side
//! (`watcher.rs`), downloads (`edgeroute-hub`).

use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

use crate::backend::triton::valid_model_name;

/// The version directory every entry is written as (Triton's default policy serves the
/// highest numeric version; an entry has one).
pub const VERSION: &str = "1";
/// Where a vLLM entry keeps the snapshot, under the version directory: apart from
/// `model.json`, so a repository file of that name cannot collide with it.
pub const WEIGHTS_DIR: &str = "weights";
/// Largest `config.json` read: real ones are a few KiB.
pub const MAX_CONFIG_JSON_BYTES: u64 = 1024 * 1024;
/// At most this many file names are quoted in an error.
const MAX_NAMED: usize = 4;

/// Why a snapshot cannot become a Triton entry. Each names the model's files or the setting
/// at fault, so the reason on the `failed` model says what to change.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error(
        "`{0}` is not a valid Triton model name ([A-Za-z0-9._-], at most 128, not starting \
         with `.`): give `id` or `options.upstream_name`"
    )]
    InvalidName(String),
    #[error(
        "GGUF weights ({0}) have no Triton backend on this node: serve GGUF through an \
         OpenAI-compatible upstream such as llama.cpp, or load the repository's safetensors \
         or ONNX files"
    )]
    Gguf(String),
    #[error(
        "both safetensors weights and ONNX graphs are selected: choose one format with `files`"
    )]
    Ambiguous,
    #[error("{count} ONNX graphs are selected ({named}): choose one with `files`")]
    SeveralGraphs { count: usize, named: String },
    #[error(
        "safetensors weights without a top-level config.json: vLLM needs the model's \
         config.json (add it to `files`)"
    )]
    NoConfigJson,
    #[error("config.json is not usable: {0}")]
    BadConfigJson(String),
    #[error("config.json names no `architectures`: vLLM cannot tell which model class to run")]
    NoArchitectures,
    #[error("no format Triton serves here: {0}")]
    Unrecognized(String),
    #[error(
        "Triton's model repository path `{0}` must be absolute UTF-8 (backend.triton_repository)"
    )]
    RepositoryPath(String),
    #[error(
        "`{0}` already exists in the model repository and is not a Triton entry (another \
         model's download): give `id` or `options.upstream_name`"
    )]
    NameTaken(String),
    #[error("`{0}` is not a safe relative path")]
    UnsafePath(String),
    #[error("the entry was refused: {0}")]
    Finish(String),
    #[error("{op} {path}: {source}")]
    Io { op: &'static str, path: PathBuf, source: std::io::Error },
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ConvertError {
    let path = path.to_owned();
    move |source| ConvertError::Io { op, path, source }
}

/// What a snapshot is, judged from its file names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Format {
    /// A transformer checkpoint for Triton's vLLM backend.
    Vllm,
    /// One ONNX graph (its repository path) for Triton's ONNX Runtime backend.
    Onnx { graph: String },
}

fn extension(path: &str) -> Option<String> {
    let name = path.rsplit('/').next().unwrap_or(path);
    name.rsplit_once('.').map(|(_, ext)| ext.to_ascii_lowercase())
}

fn named(paths: &[&str]) -> String {
    let mut s = paths.iter().take(MAX_NAMED).copied().collect::<Vec<_>>().join(", ");
    if paths.len() > MAX_NAMED {
        s.push_str(", …");
    }
    s
}

/// The format of a snapshot from its repository paths alone (no I/O): ONNX when exactly one
/// `.onnx` graph is selected, vLLM when `*.safetensors` come with a top-level `config.json`;
/// GGUF, a mix, several graphs or nothing recognisable is an error.
pub fn classify<'a>(paths: impl IntoIterator<Item = &'a str>) -> Result<Format, ConvertError> {
    let (mut graphs, mut safetensors, mut gguf) = (Vec::new(), false, Vec::new());
    let mut config = false;
    for p in paths {
        match extension(p).as_deref() {
            Some("onnx") => graphs.push(p),
            Some("safetensors") => safetensors = true,
            Some("gguf") => gguf.push(p),
            _ => {}
        }
        config |= p == "config.json";
    }
    match (graphs.len(), safetensors) {
        (1.., true) => Err(ConvertError::Ambiguous),
        (1, false) => Ok(Format::Onnx { graph: graphs[0].to_owned() }),
        (2.., false) => {
            Err(ConvertError::SeveralGraphs { count: graphs.len(), named: named(&graphs) })
        }
        (0, true) if config => Ok(Format::Vllm),
        (0, true) => Err(ConvertError::NoConfigJson),
        (0, false) if !gguf.is_empty() => Err(ConvertError::Gguf(named(&gguf))),
        (0, false) => Err(ConvertError::Unrecognized(
            "neither config.json + .safetensors nor an .onnx graph".into(),
        )),
    }
}

/// Where and how the entry will be served.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// The Triton model name: the entry's directory and the `name` in its config.
    pub name: &'a str,
    /// The CUDA device index the model is pinned to.
    pub device: u32,
    /// Triton's model repository as Triton (and `edgeroute watch --repository`) see it: a
    /// vLLM entry names its weights by an absolute path under it.
    pub repository: &'a Path,
}

/// One file of an entry, relative to the entry's directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryFile {
    /// Written by us: `config.pbtxt`, `1/model.json`.
    Generated { path: String, contents: String },
    /// A file of the snapshot (`from`, its repository path) placed at `to`.
    Linked { from: String, to: String },
}

/// A Triton model-repository entry, decided but not yet written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub format: Format,
    pub files: Vec<EntryFile>,
}

impl Entry {
    /// The generated file at `path` (`config.pbtxt`, `1/model.json`), if any.
    pub fn generated(&self, path: &str) -> Option<&str> {
        self.files.iter().find_map(|f| match f {
            EntryFile::Generated { path: p, contents } if p == path => Some(contents.as_str()),
            _ => None,
        })
    }

    /// The entry's `config.pbtxt`.
    pub fn config_pbtxt(&self) -> &str {
        self.generated("config.pbtxt").unwrap_or_default()
    }
}

/// The instance group pinning one instance to `device`. Both backends honour `KIND_GPU`:
/// Triton places ONNX Runtime's session on that device, and the vLLM backend sets
/// `CUDA_VISIBLE_DEVICES` to it for a single-GPU engine (multi-GPU engines would need
/// `KIND_MODEL`; this node places a model on one GPU).
fn instance_group(device: u32) -> String {
    format!(
        "instance_group [\n  {{\n    count: 1\n    kind: KIND_GPU\n    gpus: [ {device} ]\n  }}\n]\n"
    )
}

/// Generated configs say so, and that hand edits break the seal.
const HEADER: &str = "# Written by edgeroute from a Hugging Face snapshot. Regenerate, do not edit: once sealed,\n# an edit is a refusal.\n";

/// `config.pbtxt` for the vLLM backend. Its inputs and output are the backend's own (as its
/// auto-complete would add them), written out so the entry also loads when Triton runs with
/// `--disable-auto-complete-config`; batching is vLLM's, so Triton's is off, and the backend
/// requires the decoupled transaction policy.
pub fn vllm_config(name: &str, device: u32) -> String {
    format!(
        "{HEADER}name: \"{name}\"\nbackend: \"vllm\"\nmax_batch_size: 0\n\
         model_transaction_policy {{\n  decoupled: true\n}}\n\
         input [\n\
         \x20 {{\n    name: \"text_input\"\n    data_type: TYPE_STRING\n    dims: [ 1 ]\n  }},\n\
         \x20 {{\n    name: \"stream\"\n    data_type: TYPE_BOOL\n    dims: [ 1 ]\n    optional: true\n  }},\n\
         \x20 {{\n    name: \"sampling_parameters\"\n    data_type: TYPE_STRING\n    dims: [ 1 ]\n    optional: true\n  }},\n\
         \x20 {{\n    name: \"exclude_input_in_output\"\n    data_type: TYPE_BOOL\n    dims: [ 1 ]\n    optional: true\n  }}\n\
         ]\n\
         output [\n\
         \x20 {{\n    name: \"text_output\"\n    data_type: TYPE_STRING\n    dims: [ -1 ]\n  }}\n\
         ]\n{}",
        instance_group(device)
    )
}

/// `config.pbtxt` for ONNX Runtime. Inputs, outputs and batching are read from the graph by
/// Triton's auto-complete (on by default), which knows them better than a guess here.
pub fn onnx_config(name: &str, device: u32) -> String {
    format!("{HEADER}name: \"{name}\"\nbackend: \"onnxruntime\"\n{}", instance_group(device))
}

/// vLLM's engine arguments (`AsyncEngineArgs(**model.json)`): the weights' absolute path as
/// Triton sees it (vLLM resolves a relative one against its working directory, not the model
/// directory), and safetensors only, so vLLM never falls back to unpickling a `.bin`. Nothing
/// else: an argument a given vLLM release does not know fails the load.
pub fn vllm_model_json(weights: &Path) -> Result<String, ConvertError> {
    let path = weights
        .to_str()
        .filter(|_| weights.is_absolute())
        .ok_or_else(|| ConvertError::RepositoryPath(weights.display().to_string()))?;
    let json = serde_json::json!({ "model": path, "load_format": "safetensors" });
    serde_json::to_string_pretty(&json)
        .map(|s| s + "\n")
        .map_err(|e| ConvertError::BadConfigJson(e.to_string()))
}

/// Checks that `config.json` is a JSON object naming at least one architecture, which is what
/// vLLM picks the model class by.
pub fn check_config_json(bytes: &[u8]) -> Result<(), ConvertError> {
    if bytes.len() as u64 > MAX_CONFIG_JSON_BYTES {
        return Err(ConvertError::BadConfigJson(format!(
            "larger than {MAX_CONFIG_JSON_BYTES} bytes"
        )));
    }
    let v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| ConvertError::BadConfigJson(e.to_string()))?;
    let obj = v.as_object().ok_or_else(|| ConvertError::BadConfigJson("not an object".into()))?;
    match obj.get("architectures").and_then(|a| a.as_array()) {
        Some(a) if !a.is_empty() && a.iter().all(|x| x.as_str().is_some_and(|s| !s.is_empty())) => {
            Ok(())
        }
        _ => Err(ConvertError::NoArchitectures),
    }
}

/// True for the external tensor data of `graph` (`model.onnx_data`, `model.onnx.data`) in the
/// graph's own directory: ONNX Runtime finds it by the name the graph records, next to it.
fn is_external_data(graph: &str, path: &str) -> bool {
    let dir = |p: &str| p.rsplit_once('/').map_or("", |(d, _)| d).to_owned();
    if dir(graph) != dir(path) || path == graph {
        return false;
    }
    let name = path.rsplit('/').next().unwrap_or(path).to_ascii_lowercase();
    name.ends_with(".onnx_data") || name.ends_with(".onnx.data")
}

/// The entry for a snapshot holding `files` (repository paths) whose `config.json`, if any,
/// is `config_json`. Pure: nothing is read or written.
pub fn plan_entry(
    files: &[String],
    config_json: Option<&[u8]>,
    target: &Target<'_>,
) -> Result<Entry, ConvertError> {
    let name = target.name;
    if !valid_model_name(name) {
        return Err(ConvertError::InvalidName(name.to_owned()));
    }
    let format = classify(files.iter().map(String::as_str))?;
    let mut out = Vec::new();
    match &format {
        Format::Vllm => {
            check_config_json(config_json.ok_or(ConvertError::NoConfigJson)?)?;
            let weights = target.repository.join(name).join(VERSION).join(WEIGHTS_DIR);
            out.push(EntryFile::Generated {
                path: "config.pbtxt".into(),
                contents: vllm_config(name, target.device),
            });
            out.push(EntryFile::Generated {
                path: format!("{VERSION}/model.json"),
                contents: vllm_model_json(&weights)?,
            });
            for f in files {
                out.push(EntryFile::Linked {
                    from: f.clone(),
                    to: format!("{VERSION}/{WEIGHTS_DIR}/{f}"),
                });
            }
        }
        Format::Onnx { graph } => {
            out.push(EntryFile::Generated {
                path: "config.pbtxt".into(),
                contents: onnx_config(name, target.device),
            });
            out.push(EntryFile::Linked {
                from: graph.clone(),
                to: format!("{VERSION}/model.onnx"),
            });
            for f in files.iter().filter(|f| is_external_data(graph, f)) {
                let base = f.rsplit('/').next().unwrap_or(f);
                out.push(EntryFile::Linked { from: f.clone(), to: format!("{VERSION}/{base}") });
            }
        }
    }
    Ok(Entry { name: name.to_owned(), format, files: out })
}

/// `base/rel` for a relative path of plain names only.
fn safe_join(base: &Path, rel: &str) -> Result<PathBuf, ConvertError> {
    let p = Path::new(rel);
    if rel.is_empty() || !p.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(ConvertError::UnsafePath(rel.escape_debug().to_string()));
    }
    Ok(base.join(p))
}

/// Reads the snapshot's top-level `config.json`, if it has one (a regular file, at most
/// [`MAX_CONFIG_JSON_BYTES`]). Blocking.
pub fn read_config_json(snapshot: &Path) -> Result<Option<Vec<u8>>, ConvertError> {
    let path = snapshot.join("config.json");
    match std::fs::symlink_metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io("checking", &path)(e)),
        Ok(m) if !m.is_file() => {
            return Err(ConvertError::BadConfigJson("not a regular file".into()));
        }
        Ok(_) => {}
    }
    let mut bytes = Vec::new();
    std::fs::File::open(&path)
        .and_then(|f| f.take(MAX_CONFIG_JSON_BYTES + 1).read_to_end(&mut bytes))
        .map_err(io("reading", &path))?;
    Ok(Some(bytes))
}

/// Most files [`snapshot_files`] lists: as many as a seal may (a model is a handful).
pub const MAX_SNAPSHOT_FILES: usize = 10_000;

/// The regular files under `dir`, as `/`-separated relative paths, sorted: a snapshot that
/// is not a hub install (`edgeroute model triton-config --dir`). Symlinks, special files,
/// names that are not UTF-8 and more than [`MAX_SNAPSHOT_FILES`] files are refused, and
/// hidden entries (a seal, `.git`) are skipped. Blocking.
pub fn snapshot_files(dir: &Path) -> Result<Vec<String>, ConvertError> {
    fn walk(dir: &Path, prefix: &str, out: &mut Vec<String>) -> Result<(), ConvertError> {
        for e in std::fs::read_dir(dir).map_err(io("listing", dir))? {
            let e = e.map_err(io("listing", dir))?;
            let name = e.file_name();
            let name = name
                .to_str()
                .ok_or_else(|| ConvertError::UnsafePath(name.to_string_lossy().into_owned()))?;
            if name.starts_with('.') {
                continue;
            }
            let rel = format!("{prefix}{name}");
            let t = e.file_type().map_err(io("checking", &e.path()))?;
            if t.is_dir() {
                walk(&e.path(), &format!("{rel}/"), out)?;
            } else if t.is_file() {
                if out.len() >= MAX_SNAPSHOT_FILES {
                    return Err(ConvertError::Unrecognized(format!(
                        "more than {MAX_SNAPSHOT_FILES} files"
                    )));
                }
                out.push(rel);
            } else {
                return Err(ConvertError::UnsafePath(format!("{rel} (not a regular file)")));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, "", &mut out)?;
    out.sort();
    Ok(out)
}

fn sync_dir(dir: &Path) -> Result<(), ConvertError> {
    std::fs::File::open(dir).and_then(|f| f.sync_all()).map_err(io("syncing", dir))
}

/// Whether `dir` is a Triton entry (a directory holding a `config.pbtxt`), which a new
/// conversion may replace, as opposed to anything else of that name.
fn is_entry(dir: &Path) -> bool {
    std::fs::symlink_metadata(dir).is_ok_and(|m| m.is_dir())
        && std::fs::symlink_metadata(dir.join("config.pbtxt")).is_ok_and(|m| m.is_file())
}

/// Lays `entry` out in `staging` (a fresh path on the repository's filesystem), with the
/// snapshot's files hard-linked from `snapshot` (copied where linking fails), fsyncs it, lets
/// `finish` check and seal it (given the staged directory and the entry's name), and renames
/// it to `root/<name>`, replacing an earlier entry of that name.
/// Anything else already called `<name>` is left alone and refused. On any error the staging
/// directory is removed and the repository is as it was. Returns the entry's path. Blocking.
pub fn write_entry(
    entry: &Entry,
    snapshot: &Path,
    root: &Path,
    staging: &Path,
    finish: impl FnOnce(&Path, &str) -> Result<(), String>,
) -> Result<PathBuf, ConvertError> {
    let dest = safe_join(root, &entry.name)?;
    if std::fs::symlink_metadata(&dest).is_ok() && !is_entry(&dest) {
        return Err(ConvertError::NameTaken(entry.name.clone()));
    }
    let built = assemble(entry, snapshot, staging)
        .and_then(|()| finish(staging, &entry.name).map_err(ConvertError::Finish));
    if let Err(e) = built {
        let _ = std::fs::remove_dir_all(staging);
        return Err(e);
    }
    let aside = staging.with_extension("replaced");
    let had_old = is_entry(&dest);
    if had_old && let Err(e) = std::fs::rename(&dest, &aside) {
        let _ = std::fs::remove_dir_all(staging);
        return Err(io("moving aside", &dest)(e));
    }
    if let Err(e) = std::fs::rename(staging, &dest) {
        if had_old {
            let _ = std::fs::rename(&aside, &dest);
        }
        let _ = std::fs::remove_dir_all(staging);
        return Err(io("renaming into place", &dest)(e));
    }
    sync_dir(root)?;
    if had_old {
        let _ = std::fs::remove_dir_all(&aside);
    }
    Ok(dest)
}

fn assemble(entry: &Entry, snapshot: &Path, staging: &Path) -> Result<(), ConvertError> {
    std::fs::create_dir_all(staging).map_err(io("creating", staging))?;
    let mut dirs = vec![staging.to_owned()];
    for f in &entry.files {
        let to = match f {
            EntryFile::Generated { path, .. } | EntryFile::Linked { to: path, .. } => path,
        };
        let dst = safe_join(staging, to)?;
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent).map_err(io("creating", parent))?;
            if !dirs.iter().any(|d| d == parent) {
                dirs.push(parent.to_owned());
            }
        }
        match f {
            EntryFile::Generated { contents, .. } => {
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&dst)
                    .map_err(io("creating", &dst))?;
                file.write_all(contents.as_bytes())
                    .and_then(|()| file.sync_all())
                    .map_err(io("writing", &dst))?;
            }
            EntryFile::Linked { from, .. } => {
                let src = safe_join(snapshot, from)?;
                let meta = std::fs::symlink_metadata(&src).map_err(io("checking", &src))?;
                if !meta.is_file() {
                    return Err(ConvertError::UnsafePath(format!("{from} (not a regular file)")));
                }
                // A link shares the install's bytes: the entry costs no disk. The installer
                // never rewrites an installed file in place, so the two cannot diverge.
                std::fs::hard_link(&src, &dst)
                    .or_else(|_| std::fs::copy(&src, &dst).map(drop))
                    .map_err(io("linking", &src))?;
                std::fs::File::open(&dst)
                    .and_then(|f| f.sync_all())
                    .map_err(io("syncing", &dst))?;
            }
        }
    }
    // Deepest first, so each directory is synced after its entries.
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    dirs.iter().try_for_each(|d| sync_dir(d))
}

/// Removes the entry `root/<name>` (only a Triton entry: a directory holding `config.pbtxt`),
/// moved to `trash` (a fresh path on the same filesystem) first so no reader sees half of it.
/// Returns whether there was one. Blocking.
pub fn remove_entry(root: &Path, name: &str, trash: &Path) -> Result<bool, ConvertError> {
    let dir = safe_join(root, name)?;
    if !is_entry(&dir) {
        return Ok(false);
    }
    std::fs::rename(&dir, trash).map_err(io("moving out of the repository", &dir))?;
    sync_dir(root)?;
    std::fs::remove_dir_all(trash).map_err(io("deleting", trash))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    const LLAMA: &[u8] = br#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}"#;

    fn target(name: &str, device: u32) -> Target<'_> {
        Target { name, device, repository: Path::new("/models") }
    }

    #[test]
    fn formats_are_told_apart_by_file_names() {
        let f = |names: &[&str]| classify(names.iter().copied());
        assert_eq!(
            f(&["config.json", "model.safetensors", "tokenizer.json"]).unwrap(),
            Format::Vllm
        );
        assert_eq!(
            f(&["config.json", "onnx/model.onnx"]).unwrap(),
            Format::Onnx { graph: "onnx/model.onnx".into() }
        );
        assert!(matches!(f(&["model.safetensors"]), Err(ConvertError::NoConfigJson)));
        assert!(matches!(
            f(&["config.json", "model.safetensors", "model.onnx"]),
            Err(ConvertError::Ambiguous)
        ));
        let Err(ConvertError::SeveralGraphs { count: 2, named }) =
            f(&["onnx/model.onnx", "onnx/model_quantized.onnx"])
        else {
            panic!("two graphs accepted")
        };
        assert!(named.contains("model_quantized.onnx"), "{named}");
        let Err(ConvertError::Gguf(g)) = f(&["config.json", "m.Q4_1.gguf"]) else {
            panic!("GGUF accepted")
        };
        assert!(g.contains("m.Q4_1.gguf"));
        assert!(matches!(f(&["README.md"]), Err(ConvertError::Unrecognized(_))));
        assert!(matches!(f(&[]), Err(ConvertError::Unrecognized(_))));
        // A config.json in a subdirectory is not the model's.
        assert!(matches!(
            f(&["sub/config.json", "x.safetensors"]),
            Err(ConvertError::NoConfigJson)
        ));
    }

    #[test]
    fn a_transformer_checkpoint_becomes_a_vllm_entry_pinned_to_its_gpu() {
        let snapshot = files(&[
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "generation_config.json",
        ]);
        let e = plan_entry(&snapshot, Some(LLAMA), &target("smollm2", 2)).unwrap();
        assert_eq!(e.format, Format::Vllm);
        let config = e.config_pbtxt();
        for line in [
            "name: \"smollm2\"",
            "backend: \"vllm\"",
            "max_batch_size: 0",
            "decoupled: true",
            "kind: KIND_GPU",
            "gpus: [ 2 ]",
            "name: \"text_input\"",
            "name: \"text_output\"",
        ] {
            assert!(config.contains(line), "{line} missing:\n{config}");
        }
        let model: serde_json::Value =
            serde_json::from_str(e.generated("1/model.json").unwrap()).unwrap();
        assert_eq!(
            model,
            serde_json::json!({"model": "/models/smollm2/1/weights", "load_format": "safetensors"})
        );
        let linked: Vec<(&str, &str)> = e
            .files
            .iter()
            .filter_map(|f| match f {
                EntryFile::Linked { from, to } => Some((from.as_str(), to.as_str())),
                EntryFile::Generated { .. } => None,
            })
            .collect();
        assert_eq!(linked.len(), snapshot.len(), "every file of the snapshot goes along");
        assert!(linked.contains(&("model.safetensors", "1/weights/model.safetensors")));
        assert!(linked.contains(&("config.json", "1/weights/config.json")));
    }

    #[test]
    fn an_onnx_graph_becomes_an_onnxruntime_entry_with_its_external_data() {
        let snapshot = files(&[
            "config.json",
            "onnx/model.onnx",
            "onnx/model.onnx_data",
            "other/x.onnx_data",
            "tokenizer.json",
        ]);
        let e = plan_entry(&snapshot, None, &target("whisper-enc", 1)).unwrap();
        assert_eq!(e.format, Format::Onnx { graph: "onnx/model.onnx".into() });
        let config = e.config_pbtxt();
        assert!(config.contains("backend: \"onnxruntime\""), "{config}");
        assert!(config.contains("gpus: [ 1 ]"), "{config}");
        assert!(e.generated("1/model.json").is_none());
        let linked: Vec<&EntryFile> =
            e.files.iter().filter(|f| matches!(f, EntryFile::Linked { .. })).collect();
        assert_eq!(
            linked,
            [
                &EntryFile::Linked { from: "onnx/model.onnx".into(), to: "1/model.onnx".into() },
                &EntryFile::Linked {
                    from: "onnx/model.onnx_data".into(),
                    to: "1/model.onnx_data".into()
                },
            ],
            "the graph and its own external data only"
        );
    }

    #[test]
    fn what_cannot_be_served_is_refused_with_its_reason() {
        let st = files(&["config.json", "model.safetensors"]);
        let refuse = |json: Option<&[u8]>| plan_entry(&st, json, &target("m", 0)).unwrap_err();
        assert!(matches!(refuse(None), ConvertError::NoConfigJson));
        assert!(matches!(refuse(Some(b"{not json")), ConvertError::BadConfigJson(_)));
        assert!(matches!(refuse(Some(b"[1]")), ConvertError::BadConfigJson(_)));
        assert!(matches!(refuse(Some(b"{}")), ConvertError::NoArchitectures));
        assert!(matches!(refuse(Some(br#"{"architectures": []}"#)), ConvertError::NoArchitectures));
        assert!(matches!(
            refuse(Some(br#"{"architectures": [7]}"#)),
            ConvertError::NoArchitectures
        ));
        let huge = vec![b' '; MAX_CONFIG_JSON_BYTES as usize + 1];
        assert!(matches!(refuse(Some(&huge)), ConvertError::BadConfigJson(_)));
        for bad in ["", ".hidden", "a/b", "a:b", &"x".repeat(129)] {
            assert!(
                matches!(
                    plan_entry(&st, Some(LLAMA), &target(bad, 0)),
                    Err(ConvertError::InvalidName(_))
                ),
                "{bad:?}"
            );
        }
        let relative = Target { name: "m", device: 0, repository: Path::new("models") };
        assert!(matches!(
            plan_entry(&st, Some(LLAMA), &relative),
            Err(ConvertError::RepositoryPath(_))
        ));
        let gguf = files(&["m.gguf"]);
        assert!(matches!(plan_entry(&gguf, None, &target("m", 0)), Err(ConvertError::Gguf(_))));
    }

    fn tempdir(tag: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("edgeroute-convert-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn an_entry_is_written_whole_or_not_at_all() {
        let base = tempdir("write");
        let (snapshot, root) = (base.join("snap"), base.join("repo"));
        std::fs::create_dir_all(snapshot.join("onnx")).unwrap();
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(snapshot.join("onnx/model.onnx"), b"graph").unwrap();
        let e = plan_entry(&files(&["onnx/model.onnx"]), None, &target("enc", 0)).unwrap();
        let dest = write_entry(&e, &snapshot, &root, &base.join("stage-1"), |_, _| Ok(())).unwrap();
        assert_eq!(dest, root.join("enc"));
        assert_eq!(std::fs::read(dest.join("1/model.onnx")).unwrap(), b"graph");
        assert!(dest.join("config.pbtxt").is_file());
        assert!(!base.join("stage-1").exists());

        // A failed seal leaves the earlier entry untouched and no staging behind. (A new
        // file renamed over the old, as the installer does: the entry's link keeps the old.)
        std::fs::write(snapshot.join("onnx/next"), b"graph-2").unwrap();
        std::fs::rename(snapshot.join("onnx/next"), snapshot.join("onnx/model.onnx")).unwrap();
        let err = write_entry(&e, &snapshot, &root, &base.join("stage-2"), |_, _| Err("no".into()))
            .unwrap_err();
        assert!(matches!(err, ConvertError::Finish(_)), "{err}");
        assert!(!base.join("stage-2").exists());
        assert_eq!(std::fs::read(root.join("enc/1/model.onnx")).unwrap(), b"graph");

        // A missing snapshot file: nothing written.
        let missing = plan_entry(&files(&["onnx/gone.onnx"]), None, &target("gone", 0)).unwrap();
        assert!(
            write_entry(&missing, &snapshot, &root, &base.join("stage-3"), |_, _| Ok(())).is_err()
        );
        assert!(!root.join("gone").exists() && !base.join("stage-3").exists());

        // Something else of that name is never replaced.
        std::fs::create_dir_all(root.join("taken/0123")).unwrap();
        let taken = plan_entry(&files(&["onnx/model.onnx"]), None, &target("taken", 0)).unwrap();
        let err = write_entry(&taken, &snapshot, &root, &base.join("stage-4"), |_, _| Ok(()))
            .unwrap_err();
        assert!(matches!(err, ConvertError::NameTaken(_)), "{err}");
        assert!(root.join("taken/0123").is_dir());

        // A replacement swaps the whole entry; removal takes it away.
        write_entry(&e, &snapshot, &root, &base.join("stage-5"), |_, _| Ok(())).unwrap();
        assert_eq!(std::fs::read(root.join("enc/1/model.onnx")).unwrap(), b"graph-2");
        assert!(remove_entry(&root, "enc", &base.join("trash")).unwrap());
        assert!(!root.join("enc").exists() && !base.join("trash").exists());
        assert!(!remove_entry(&root, "taken", &base.join("trash")).unwrap(), "not an entry");
        assert!(root.join("taken").exists());
        std::fs::remove_dir_all(base).ok();
    }
}
