//! Watcher mode for split deployments: the gateway writes models to a shared volume; this
//! process (on the backend's side) sees a new model directory appear, checks it, copies it
//! atomically into the backend's model repository and asks the backend to load it.
//!
//! A directory is taken once it is valid and has been quiet for `settle` (writers may still be
//! copying files into it). Validity for Triton: a safe directory name and a `config.pbtxt`.
//!
//! Whoever can write to the shared volume must not gain code execution on the GPU side: a
//! model that carries code — Triton's `python` backend, a custom `execution_env_path`, any
//! `.py` file — is refused unless its backend is allow-listed (`--allow-backend`). Weights-only
//! backends (ONNX Runtime, TensorRT, OpenVINO...) pass, and so does Triton's vLLM backend
//! within limits (see [`check_vllm_args`]): its code is Triton's own, from the image, and
//! what the volume brings is weights and engine arguments, which are checked. Loads and
//! unloads carry the header of Triton's restricted repository API when configured.
//!
//! Nor may it choose what the GPU side runs: by default only **sealed** directories are
//! installed (see [`edgeroute_hub::seal`]): the node's installer, or an operator's pipeline
//! (`edgeroute model seal`), signs the list of every file with its size and SHA-256, and this
//! watcher trusts only the public keys it is given (`--seal-public-key`). A candidate is
//! `<shared>/<top>/` holding a seal (a flat Triton directory) or, in the installer's layout,
//! `<shared>/<top>/<commit>/` (the newest seal, by `iat`, wins); the seal must name `<top>` as
//! its model, so a sealed directory copied under another name is refused. The order closes
//! the race with a writer still holding the shared volume: the candidate is copied into a
//! staging directory inside the repository first (symlinks and special files refused, at most
//! the sealed number of files and bytes), and the seal and the code check run on that copy,
//! which only this process writes; then it is renamed into place. The seal file is kept in
//! the installed directory (Triton ignores it), so the installed copy can be re-verified.
//! Without keys the watcher refuses to start unless unsealed models are explicitly allowed
//! (`--allow-unsealed`), which restores the old trust-the-volume behaviour.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use edgeroute_hub::seal::{MAX_SEAL_BYTES, SEAL_FILE, SealError, SealVerifier, verify_dir};

use crate::backend::triton::{TritonRepository, valid_model_name};

// For `edgeroute model seal` and the tests: the binary reaches the hub crate through here.
pub use edgeroute_hub::seal::{self, Seal, SealSigner, seal_dir};

#[derive(Debug, Clone)]
pub struct WatchConfig {
    /// The shared volume the gateway writes models to.
    pub shared: PathBuf,
    /// The backend's model repository.
    pub repository: PathBuf,
    /// Triton's HTTP endpoint; without it models are only copied.
    pub triton_url: Option<String>,
    /// Quiet time before a directory is taken.
    pub settle: Duration,
    /// Backends whose models may carry code (e.g. `python`); none by default.
    pub allow_backends: Vec<String>,
    /// Header (name, value) of Triton's restricted repository API, when it is restricted.
    pub triton_restricted: Option<(String, String)>,
    /// The keys seals are trusted under. With none, [`run`] refuses to start unless
    /// `allow_unsealed` is set.
    pub seal_keys: Option<SealVerifier>,
    /// Install directories without a seal (as before seals existed). A directory that has a
    /// seal must still verify. Off by default.
    pub allow_unsealed: bool,
    /// Carry out the gateway's signed load orders ([`crate::orders`]): download from the hub
    /// with this token and these settings, convert, install, load. Needs `seal_keys` (orders
    /// are signed). Default: none (orders are not read).
    pub hub: Option<crate::orders::HubSettings>,
    /// How often `<shared>/.orders/` is read again besides change events, which a shared
    /// network filesystem does not deliver for another machine's writes.
    pub order_poll: Duration,
}

/// Most entries of `<shared>/<top>/` looked at for sealed commit directories.
const MAX_COMMIT_DIRS: usize = 256;

/// Largest `config.pbtxt` read.
const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// Largest `model.json` (vLLM's engine arguments) read.
const MAX_MODEL_JSON_BYTES: u64 = 64 * 1024;

/// The vLLM engine arguments a `model.json` from the shared volume may set: where the weights
/// are and how much of the GPU to use — data, each of which vLLM reads as a value. Anything
/// else is refused, because several arguments make vLLM run code or fetch it:
/// `trust_remote_code` (the model's own Python), a hub id as `model` (a download, code and
/// all, on the GPU side, bypassing the seal), `worker_cls` and the like (classes imported by
/// name), `load_format` other than safetensors (unpickling). An operator who needs more
/// allows the backend outright (`--allow-backend vllm`).
pub const VLLM_DATA_ARGS: &[&str] = &[
    "model",
    "tokenizer",
    "load_format",
    "trust_remote_code",
    "served_model_name",
    "dtype",
    "max_model_len",
    "max_num_seqs",
    "gpu_memory_utilization",
    "enforce_eager",
    "seed",
    "disable_log_stats",
    "disable_log_requests",
];

/// `path` is absolute, plain (no `.` or `..`), and under `within`.
fn path_within(path: &str, within: &Path) -> bool {
    let p = Path::new(path);
    p.is_absolute()
        && p.components()
            .all(|c| matches!(c, std::path::Component::RootDir | std::path::Component::Normal(_)))
        && p.starts_with(within)
}

/// Why a vLLM `model.json` would make vLLM run code or load from outside its own model
/// directory (`installed_at`, where the watcher installs the entry), if it would: a JSON
/// object of [`VLLM_DATA_ARGS`] only, `trust_remote_code` false if given, `load_format`
/// `safetensors` if given, and `model` (required) and `tokenizer` absolute paths inside
/// `installed_at`. Pure.
pub fn check_vllm_args(json: &[u8], installed_at: &Path) -> Result<(), String> {
    let v: serde_json::Value =
        serde_json::from_slice(json).map_err(|e| format!("model.json is not JSON: {e}"))?;
    let args = v.as_object().ok_or("model.json is not a JSON object")?;
    if let Some(k) = args.keys().find(|k| !VLLM_DATA_ARGS.contains(&k.as_str())) {
        return Err(format!(
            "model.json sets `{k}`, which is not among the data-only vLLM arguments ({})",
            VLLM_DATA_ARGS.join(", ")
        ));
    }
    if args.get("trust_remote_code").is_some_and(|t| t != &serde_json::Value::Bool(false)) {
        return Err("model.json sets `trust_remote_code`: the model's own Python would run".into());
    }
    if let Some(f) = args.get("load_format")
        && f.as_str() != Some("safetensors")
    {
        return Err(format!(
            "model.json sets `load_format` {f}: only \"safetensors\" never unpickles"
        ));
    }
    for key in ["model", "tokenizer"] {
        match args.get(key) {
            None if key == "tokenizer" => {}
            Some(serde_json::Value::String(p)) if path_within(p, installed_at) => {}
            other => {
                let shown = other.map_or_else(|| "nothing".to_owned(), ToString::to_string);
                return Err(format!(
                    "model.json's `{key}` is {shown}, not a path inside `{}`, where this entry \
                     is installed (a hub id would download on the GPU side; set the node's \
                     backend.triton_repository to this watcher's --repository)",
                    installed_at.display()
                ));
            }
        }
    }
    Ok(())
}

/// The `model.json` of every numeric version directory of `dir`.
fn vllm_arg_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else { return vec![] };
    rd.flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())))
        .map(|e| e.path().join("model.json"))
        .collect()
}

/// Why a model directory carries code the backend would run, if it does and its backend is
/// not in `allow`. Reads `config.pbtxt` (`backend`, `platform`, `execution_env_path`) and
/// looks for `.py` files anywhere in the directory (symlinks are not followed). The vLLM
/// backend (Triton's code, from the image) passes when its engine arguments do
/// ([`check_vllm_args`], with `installed_at` the directory the entry will be installed as)
/// and no pickled weights sit beside them.
pub fn check_code(dir: &Path, installed_at: &Path, allow: &[String]) -> Result<(), String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(dir.join("config.pbtxt"))
        .and_then(|f| f.take(MAX_CONFIG_BYTES).read_to_string(&mut text))
        .map_err(|e| format!("reading config.pbtxt: {e}"))?;
    let backends: Vec<String> =
        ["backend", "platform"].iter().flat_map(|k| field_values(&text, k)).collect();
    let allowed = |b: &str| allow.iter().any(|a| a == b);
    if let Some(b) = backends.iter().find(|b| b.as_str() == "python" && !allowed(b)) {
        return Err(format!("backend `{b}` runs code from the model directory"));
    }
    if backends.iter().any(|b| b == "vllm") && !allowed("vllm") {
        for file in vllm_arg_files(dir) {
            let mut json = Vec::new();
            match std::fs::File::open(&file) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(format!("reading {}: {e}", file.display())),
                Ok(f) => f
                    .take(MAX_MODEL_JSON_BYTES + 1)
                    .read_to_end(&mut json)
                    .map_err(|e| format!("reading {}: {e}", file.display()))?,
            };
            if json.len() as u64 > MAX_MODEL_JSON_BYTES {
                return Err(format!("model.json is larger than {MAX_MODEL_JSON_BYTES} bytes"));
            }
            check_vllm_args(&json, installed_at)?;
        }
        if let Some(p) = find_file(dir, &|p| p.to_str().is_some_and(edgeroute_hub::is_pickle)) {
            return Err(format!("`{}` is a pickle, which vLLM would unpickle", p.display()));
        }
    }
    if !field_values(&text, "execution_env_path").is_empty() && !allowed("python") {
        return Err("`execution_env_path` brings a Python environment".into());
    }
    if let Some(py) = find_file(dir, &|p| p.extension().is_some_and(|x| x == "py")) {
        let named = backends.first().map_or("none", String::as_str);
        if !backends.iter().any(|b| allowed(b)) {
            return Err(format!(
                "`{}` is code, and backend `{named}` is not allowed to carry code",
                py.display()
            ));
        }
    }
    Ok(())
}

/// The quoted values of `key: "value"` in a protobuf text file (any line layout).
fn field_values(text: &str, key: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find(key) {
        let before = rest[..i].chars().next_back();
        let after = &rest[i + key.len()..];
        rest = after;
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        let Some(value) = after.trim_start().strip_prefix(':') else { continue };
        let Some(value) = value.trim_start().strip_prefix('"') else { continue };
        if let Some(end) = value.find('"') {
            out.push(value[..end].to_owned());
        }
    }
    out
}

/// The first regular file under `dir` that `wanted` picks, if any.
fn find_file(dir: &Path, wanted: &dyn Fn(&Path) -> bool) -> Option<PathBuf> {
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let Ok(t) = e.file_type() else { continue };
        let p = e.path();
        if t.is_dir() {
            if let Some(found) = find_file(&p, wanted) {
                return Some(found);
            }
        } else if t.is_file() && wanted(&p) {
            return Some(p);
        }
    }
    None
}

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("watching {path}: {source}")]
    Notify { path: String, source: notify::Error },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error(
        "no trusted seal key: give --seal-public-key KID=FILE (the public key of the node's \
         `models.seal_key_file`, or of `edgeroute model seal`), or --allow-unsealed to install \
         whatever appears on the shared volume"
    )]
    NoSealKeys,
    #[error(
        "--hf-token-file: load orders are signed; give --seal-public-key KID=FILE (the node's \
         seal key) — --allow-unsealed does not extend to orders"
    )]
    OrdersNeedKeys,
    #[error("the download area: {0}")]
    Hub(#[from] edgeroute_hub::HubError),
}

/// Why a candidate directory was not installed. Each names what was refused and why.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("not a model: {0}")]
    NotAModel(String),
    #[error("seal refused: {0}")]
    Seal(#[from] SealError),
    #[error(
        "sealed for model `{sealed}`, found as `{top}` (a sealed directory copied under another name)"
    )]
    WrongModel { sealed: String, top: String },
    #[error("carries code: {0} (a model that carries code needs its backend in --allow-backend)")]
    Code(String),
    #[error("copy refused: {0}")]
    Copy(String),
    #[error("{op}: {source}")]
    Io { op: String, source: std::io::Error },
}

/// Why a directory is not (yet) a model.
pub fn check_model_dir(dir: &Path) -> Result<String, String> {
    let name = dir.file_name().and_then(|n| n.to_str()).ok_or("not a UTF-8 name")?.to_owned();
    if !valid_model_name(&name) {
        return Err(format!("`{name}` is not a valid model name"));
    }
    if !dir.join("config.pbtxt").is_file() {
        return Err(format!("`{name}` has no config.pbtxt yet"));
    }
    Ok(name)
}

/// What one copy may bring: a sealed candidate brings at most what its seal lists.
#[derive(Debug, Clone, Copy)]
struct Budget {
    files: usize,
    bytes: u64,
}

/// Copies `from` into `to`, refusing symlinks and special files (a model directory holds its
/// own files) and stopping once `budget` is spent (a hostile writer cannot fill the
/// repository's disk before the seal is checked).
fn copy_tree(from: &Path, to: &Path, budget: &mut Budget) -> Result<(), Refusal> {
    let ioe = |op: &str, p: &Path| {
        let op = format!("{op} {}", p.display());
        move |source| Refusal::Io { op, source }
    };
    std::fs::create_dir_all(to).map_err(ioe("creating", to))?;
    for e in std::fs::read_dir(from).map_err(ioe("listing", from))? {
        let e = e.map_err(ioe("listing", from))?;
        let t = e.file_type().map_err(ioe("checking", &e.path()))?;
        let dest = to.join(e.file_name());
        if t.is_dir() {
            copy_tree(&e.path(), &dest, budget)?;
        } else if t.is_file() {
            budget.files = budget
                .files
                .checked_sub(1)
                .ok_or_else(|| Refusal::Copy("more files than the seal lists".into()))?;
            let n = std::fs::copy(e.path(), &dest).map_err(ioe("copying", &e.path()))?;
            budget.bytes = budget
                .bytes
                .checked_sub(n)
                .ok_or_else(|| Refusal::Copy("more bytes than the seal lists".into()))?;
            std::fs::File::open(&dest).and_then(|f| f.sync_all()).map_err(ioe("syncing", &dest))?;
        } else {
            return Err(Refusal::Seal(SealError::NotARegularFile {
                path: e.path().display().to_string(),
            }));
        }
    }
    std::fs::File::open(to).and_then(|f| f.sync_all()).map_err(ioe("syncing", to))
}

/// The seal of `dir`, if it has one, checked (signature and claims only, no hashing).
fn read_seal(dir: &Path, keys: &SealVerifier) -> Option<Result<Seal, SealError>> {
    use std::io::Read;
    let path = dir.join(SEAL_FILE);
    let meta = std::fs::symlink_metadata(&path).ok()?;
    if !meta.is_file() {
        return Some(Err(SealError::NotARegularFile { path: path.display().to_string() }));
    }
    let mut token = String::new();
    let read = std::fs::File::open(&path)
        .and_then(|f| f.take(MAX_SEAL_BYTES + 1).read_to_string(&mut token));
    Some(match read {
        Err(source) => Err(SealError::Io { op: "reading", path, source }),
        Ok(_) if token.len() as u64 > MAX_SEAL_BYTES => {
            Err(SealError::TooLarge { what: "the seal".into(), limit: MAX_SEAL_BYTES })
        }
        Ok(_) => keys.verify_token(token.trim()),
    })
}

/// Which directory under `<shared>/<top>` to install, and its seal (checked for signature
/// only) when it has one: `top` itself when sealed, else the sealed `top/<commit>` with the
/// newest `iat` (ties: the greatest name), else `top` unsealed. A seal that does not verify
/// is a refusal, never a fallback to an unsealed install.
pub fn pick_candidate(
    top: &Path,
    keys: Option<&SealVerifier>,
) -> Result<(PathBuf, Option<Seal>), Refusal> {
    let Some(keys) = keys else { return Ok((top.to_owned(), None)) };
    if let Some(seal) = read_seal(top, keys) {
        return Ok((top.to_owned(), Some(seal?)));
    }
    let mut best: Option<(u64, PathBuf, Seal)> = None;
    let entries = std::fs::read_dir(top)
        .map_err(|source| Refusal::Io { op: format!("listing {}", top.display()), source })?;
    for e in entries.flatten().take(MAX_COMMIT_DIRS) {
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let Some(seal) = read_seal(&e.path(), keys) else { continue };
        let seal = seal?;
        let newer =
            best.as_ref().is_none_or(|(iat, p, _)| (seal.iat, e.path()) > (*iat, p.clone()));
        if newer {
            best = Some((seal.iat, e.path(), seal));
        }
    }
    Ok(match best {
        Some((_, dir, seal)) => (dir, Some(seal)),
        None => (top.to_owned(), None),
    })
}

/// Installs the model found under `<shared>/<top>` as `repository/<top>`: picks the candidate
/// ([`pick_candidate`]), copies it into a staging directory inside the repository, and only
/// then verifies the copy — its seal (all files, sizes, SHA-256; the model named `<top>`),
/// its `config.pbtxt`, its code ([`check_code`]) — and renames it into place. A refusal
/// removes the staging copy. Without `keys`, unsealed candidates are installed only if
/// `allow_unsealed`.
pub fn install_checked(
    top: &Path,
    repository: &Path,
    keys: Option<&SealVerifier>,
    allow_unsealed: bool,
    allow_backends: &[String],
) -> Result<String, Refusal> {
    let name = top
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Refusal::NotAModel("not a UTF-8 name".into()))?
        .to_owned();
    if !valid_model_name(&name) {
        return Err(Refusal::NotAModel(format!("`{name}` is not a valid model name")));
    }
    let (dir, seal) = pick_candidate(top, keys)?;
    let mut budget = match &seal {
        Some(s) if s.model != name => {
            return Err(Refusal::WrongModel { sealed: s.model.clone(), top: name });
        }
        Some(s) => Budget {
            files: s.files.len() + 1,
            bytes: s.files.iter().map(|f| f.bytes).fold(MAX_SEAL_BYTES, u64::saturating_add),
        },
        None if !allow_unsealed => {
            return Err(Refusal::Seal(SealError::NoSeal { dir: top.to_owned() }));
        }
        None => Budget { files: usize::MAX, bytes: u64::MAX },
    };
    if !dir.join("config.pbtxt").is_file() {
        return Err(Refusal::NotAModel(format!("`{name}` has no config.pbtxt yet")));
    }
    let staging = repository.join(format!(".staging-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    let checked = copy_tree(&dir, &staging, &mut budget).and_then(|()| {
        // From here on only the staged copy is read: the shared volume can change under us.
        if let Some(keys) = keys.filter(|_| seal.is_some()) {
            let staged = verify_dir(&staging, keys)?;
            if staged.model != name {
                return Err(Refusal::WrongModel { sealed: staged.model, top: name.clone() });
            }
        }
        check_model_dir_named(&staging, &name)?;
        check_code(&staging, &repository.join(&name), allow_backends).map_err(Refusal::Code)
    });
    if let Err(e) = checked {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }
    let io = |op: &str| {
        let op = format!("{op} `{name}`");
        move |source| Refusal::Io { op, source }
    };
    let dest = repository.join(&name);
    if dest.exists() {
        let old = repository.join(format!(".old-{name}-{}", std::process::id()));
        std::fs::rename(&dest, &old).map_err(io("replacing"))?;
        let _ = std::fs::remove_dir_all(&old);
    }
    std::fs::rename(&staging, &dest).map_err(io("installing"))?;
    std::fs::File::open(repository).and_then(|f| f.sync_all()).map_err(io("syncing"))?;
    Ok(name)
}

/// The staged copy holds a `config.pbtxt` (a regular file).
fn check_model_dir_named(dir: &Path, name: &str) -> Result<(), Refusal> {
    match std::fs::symlink_metadata(dir.join("config.pbtxt")) {
        Ok(m) if m.is_file() => Ok(()),
        _ => Err(Refusal::NotAModel(format!("`{name}` has no config.pbtxt"))),
    }
}

/// Runs until `shutdown` resolves. Returns the names installed, in order (for tests and logs).
pub async fn run(
    cfg: WatchConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<Vec<String>, WatchError> {
    if cfg.hub.is_some() && cfg.seal_keys.is_none() {
        return Err(WatchError::OrdersNeedKeys);
    }
    if cfg.seal_keys.is_none() {
        if !cfg.allow_unsealed {
            return Err(WatchError::NoSealKeys);
        }
        tracing::warn!(
            "no seal key: installing UNSEALED model directories (--allow-unsealed); whoever can \
             write to the shared volume chooses what the backend loads"
        );
    }
    std::fs::create_dir_all(&cfg.repository)?;
    // Leftovers of an interrupted copy are never loaded.
    for e in std::fs::read_dir(&cfg.repository)?.flatten() {
        if e.file_name().to_string_lossy().starts_with(".staging-") {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    let triton = match cfg.triton_url.as_deref() {
        None => None,
        Some(u) => {
            let repo = TritonRepository::new(u, Duration::from_secs(600));
            Some(match &cfg.triton_restricted {
                None => repo,
                Some((name, value)) => repo
                    .with_restricted_header(name, value)
                    .map_err(|e| WatchError::Io(std::io::Error::other(e)))?,
            })
        }
    };
    let mut sidecar = match (&cfg.hub, &cfg.seal_keys) {
        (Some(hub), Some(keys)) => Some(
            crate::orders::Sidecar::open(
                hub,
                cfg.shared.clone(),
                cfg.repository.clone(),
                keys.clone(),
                triton.clone(),
                cfg.allow_backends.clone(),
            )
            .await?,
        ),
        _ => None,
    };
    let orders_dir = cfg.shared.join(crate::orders::ORDERS_DIR);
    let status_dir = cfg.shared.join(crate::orders::STATUS_DIR);
    let (tx, mut rx) = mpsc::unbounded_channel::<PathBuf>();
    let shared = cfg.shared.clone();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        // Reads are not changes: the watcher's own reads (checking, copying) would otherwise
        // make every model look changed again, and be installed again, forever.
        if let Ok(ev) = res
            && !matches!(ev.kind, notify::EventKind::Access(_))
        {
            for p in ev.paths {
                // The model directory is the path's first component under the shared root.
                if let Ok(rel) = p.strip_prefix(&shared)
                    && let Some(first) = rel.components().next()
                {
                    let _ = tx.send(shared.join(first.as_os_str()));
                }
            }
        }
    })
    .map_err(|source| WatchError::Notify { path: cfg.shared.display().to_string(), source })?;
    watcher
        .watch(&cfg.shared, RecursiveMode::Recursive)
        .map_err(|source| WatchError::Notify { path: cfg.shared.display().to_string(), source })?;

    // Directories already present count as just changed.
    let mut pending: BTreeMap<PathBuf, tokio::time::Instant> = BTreeMap::new();
    for e in std::fs::read_dir(&cfg.shared)?.flatten() {
        if e.path().is_dir() && e.path() != orders_dir && e.path() != status_dir {
            pending.insert(e.path(), tokio::time::Instant::now());
        }
    }
    if let Some(s) = &mut sidecar {
        s.scan();
    }
    let mut order_poll = tokio::time::interval(cfg.order_poll.max(Duration::from_millis(50)));
    order_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut installed = Vec::new();
    tokio::pin!(shutdown);
    loop {
        let next_due = pending.values().min().map(|t| *t + cfg.settle);
        tokio::select! {
            () = &mut shutdown => break,
            _ = order_poll.tick(), if sidecar.is_some() => {
                if let Some(s) = &mut sidecar {
                    s.scan();
                }
            }
            Some(dir) = rx.recv() => {
                // Orders are read at once (each is acted on once); statuses are this
                // process's own writes.
                if dir == orders_dir {
                    if let Some(s) = &mut sidecar {
                        s.scan();
                    }
                } else if dir != status_dir {
                    pending.insert(dir, tokio::time::Instant::now());
                }
            }
            () = async { match next_due { Some(t) => tokio::time::sleep_until(t).await, None => std::future::pending().await } } => {
                let now = tokio::time::Instant::now();
                let due: Vec<PathBuf> = pending.iter().filter(|(_, t)| **t + cfg.settle <= now).map(|(p, _)| p.clone()).collect();
                for dir in due {
                    pending.remove(&dir);
                    if !std::fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir()) {
                        continue;
                    }
                    let (d, repo, keys, allow) = (dir.clone(), cfg.repository.clone(), cfg.seal_keys.clone(), cfg.allow_backends.clone());
                    let unsealed = cfg.allow_unsealed;
                    match tokio::task::spawn_blocking(move || install_checked(&d, &repo, keys.as_ref(), unsealed, &allow)).await {
                        Ok(Ok(name)) => {
                            tracing::info!(model = %name, "installed into the backend repository");
                            if let Some(t) = &triton
                                && let Err(e) = t.load(&name).await
                            {
                                tracing::warn!(model = %name, error = %e, "backend load failed");
                                continue;
                            }
                            installed.push(name);
                        }
                        // Still being written: quietly retried on the next change.
                        Ok(Err(Refusal::NotAModel(e))) => tracing::debug!(dir = %dir.display(), error = %e, "not a model (yet)"),
                        Ok(Err(e)) => tracing::warn!(dir = %dir.display(), error = %e, "refused, not installed"),
                        Err(e) => tracing::warn!(error = %e, "install task failed"),
                    }
                }
            }
        }
    }
    Ok(installed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vllm_engine_arguments_are_data_pointing_inside_the_entry() {
        let at = Path::new("/models/llm");
        let ok = |j: &str| check_vllm_args(j.as_bytes(), at);
        ok(r#"{"model": "/models/llm/1/weights", "load_format": "safetensors"}"#).unwrap();
        ok(r#"{"model": "/models/llm/1/weights", "tokenizer": "/models/llm/1/weights",
               "trust_remote_code": false, "gpu_memory_utilization": 0.5}"#)
        .unwrap();
        for (bad, why) in [
            (r#"{"model": "meta-llama/Llama-3.1-8B"}"#, "not a path inside"),
            (r#"{"model": "/models/other/1/weights"}"#, "not a path inside"),
            (r#"{"model": "/models/llm/../other"}"#, "not a path inside"),
            (r#"{"model": "llm/1/weights"}"#, "not a path inside"),
            (r#"{"load_format": "safetensors"}"#, "`model` is nothing"),
            (r#"{"model": "/models/llm/1", "tokenizer": "gpt2"}"#, "`tokenizer`"),
            (r#"{"model": "/models/llm/1", "trust_remote_code": true}"#, "trust_remote_code"),
            (r#"{"model": "/models/llm/1", "load_format": "pt"}"#, "load_format"),
            (r#"{"model": "/models/llm/1", "worker_cls": "x.Y"}"#, "worker_cls"),
            ("[1]", "not a JSON object"),
            ("{", "not JSON"),
        ] {
            let err = ok(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn protobuf_text_fields_are_found_in_any_layout() {
        let t = "name: \"m\"\nbackend: \"python\"\nplatform:\"onnxruntime_onnx\" max_batch_size: 8";
        assert_eq!(field_values(t, "backend"), vec!["python"]);
        assert_eq!(field_values(t, "platform"), vec!["onnxruntime_onnx"]);
        assert!(field_values("my_backend: \"python\"", "backend").is_empty(), "whole words");
        assert!(field_values("backend python", "backend").is_empty());
    }
}
