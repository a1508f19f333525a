//! A fake NVIDIA Triton: the model repository API (KServe v2 extension) over a real directory,
//! plus an OpenAI-compatible frontend that answers only for models Triton has loaded.
//!
//! Faithful where the node depends on it: `POST /v2/repository/index` lists every model
//! directory with its state; `POST /v2/repository/models/{name}/load` loads only a directory
//! that Triton would load ([`check_entry`]: a `config.pbtxt` that parses as protobuf text
//! with ModelConfig's fields, a `name` equal to the directory's, a backend it knows (given,
//! or inferred from the model file as Triton's auto-complete does), a numeric version
//! directory holding the backend's model file — `model.onnx` for ONNX Runtime, a
//! `model.json` whose `model` is a checkpoint directory for vLLM — and instance groups on
//! GPUs it has), else the model is `UNAVAILABLE` with the reason and the answer is 400 in
//! Triton's error shape; `…/unload` makes it `UNAVAILABLE`; `GET /v2/models/{name}/ready`
//! answers 200 only when ready. Inference goes to a simulator whose loaded models follow
//! Triton's.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use edgeroute_sim::{SimConfig, SimModel, Simulator};
use http::StatusCode;
use serde_json::json;

#[derive(Clone)]
pub struct FakeTriton {
    inner: Arc<Inner>,
}

struct Inner {
    repository: PathBuf,
    /// name → (state, reason)
    states: Mutex<BTreeMap<String, (&'static str, String)>>,
    sim: Arc<Simulator>,
    load_delay: Duration,
    pub loads: AtomicUsize,
    /// `--http-restricted-api=model-repository:<name>=<value>`: the header repository calls
    /// must carry.
    restricted: Option<(String, String)>,
    /// GPUs this Triton sees (device ids `0..gpus`).
    gpus: u32,
    /// name → the GPU ids of its instance groups, for loaded models.
    placed: Mutex<BTreeMap<String, Vec<u32>>>,
}

impl std::fmt::Debug for FakeTriton {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeTriton")
            .field("repository", &self.inner.repository)
            .finish_non_exhaustive()
    }
}

impl FakeTriton {
    /// A Triton serving models from `repository`, taking `load_delay` to load one.
    pub fn new(repository: impl Into<PathBuf>, load_delay: Duration) -> Self {
        let cfg = SimConfig {
            ttft_base_ms: 2,
            prefill_us_per_token: 0,
            tokens_per_s: 2000.0,
            models: vec![],
            ..SimConfig::default()
        };
        let sim = Arc::new(Simulator::new(cfg).expect("valid simulator config"));
        FakeTriton {
            inner: Arc::new(Inner {
                repository: repository.into(),
                states: Mutex::new(BTreeMap::new()),
                sim,
                load_delay,
                loads: AtomicUsize::new(0),
                restricted: None,
                gpus: 1,
                placed: Mutex::new(BTreeMap::new()),
            }),
        }
    }

    /// This Triton with `n` GPUs (device ids `0..n`; default 1): an instance group naming
    /// another is refused at load, as Triton does.
    pub fn with_gpus(mut self, n: u32) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.gpus = n;
        }
        self
    }

    /// The GPU ids the loaded model `name`'s instance groups were placed on.
    pub fn gpus_of(&self, name: &str) -> Option<Vec<u32>> {
        self.inner.placed.lock().ok()?.get(name).cloned()
    }

    /// The reason Triton gave for `name`'s state (a failed load's error).
    pub fn reason_of(&self, name: &str) -> Option<String> {
        self.inner.states.lock().ok()?.get(name).map(|(_, r)| r.clone())
    }

    /// As [`FakeTriton::new`], started with `--http-restricted-api=model-repository:name=value`:
    /// repository calls without that header are refused (403, as Triton does).
    pub fn restricted(
        repository: impl Into<PathBuf>,
        load_delay: Duration,
        name: &str,
        value: &str,
    ) -> Self {
        let mut t = Self::new(repository, load_delay);
        if let Some(inner) = Arc::get_mut(&mut t.inner) {
            inner.restricted = Some((name.to_ascii_lowercase(), value.to_owned()));
        }
        t
    }

    /// How many load requests Triton received.
    pub fn loads(&self) -> usize {
        self.inner.loads.load(Ordering::SeqCst)
    }

    pub fn state_of(&self, name: &str) -> Option<&'static str> {
        self.inner.states.lock().ok()?.get(name).map(|(s, _)| *s)
    }

    pub fn router(&self) -> Router {
        let chat = edgeroute_sim::server::router(self.inner.sim.clone());
        let repository = Router::new()
            .route("/v2/repository/index", post(index))
            .route("/v2/repository/models/{name}/load", post(load))
            .route("/v2/repository/models/{name}/unload", post(unload))
            .route_layer(axum::middleware::from_fn_with_state(self.clone(), restricted_api));
        Router::new()
            .route("/v2/health/ready", get(|| async { StatusCode::OK }))
            .merge(repository)
            .route("/v2/models/{name}/ready", get(ready))
            .with_state(self.clone())
            .merge(chat)
    }
}

async fn restricted_api(
    State(t): State<FakeTriton>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some((name, value)) = &t.inner.restricted
        && req.headers().get(name.as_str()).and_then(|v| v.to_str().ok()) != Some(value.as_str())
    {
        return triton_error(
            StatusCode::FORBIDDEN,
            format!("This API is restricted, expecting header '{name}'"),
        );
    }
    next.run(req).await
}

fn triton_error(status: StatusCode, msg: String) -> Response {
    (status, Json(json!({ "error": msg }))).into_response()
}

async fn index(State(t): State<FakeTriton>) -> Response {
    let mut out = Vec::new();
    let states = t.inner.states.lock().map(|s| s.clone()).unwrap_or_default();
    if let Ok(rd) = std::fs::read_dir(&t.inner.repository) {
        let mut names: Vec<String> = rd
            .filter_map(Result::ok)
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| !n.starts_with('.'))
            .collect();
        names.sort();
        for n in names {
            match states.get(&n) {
                Some((s, reason)) => {
                    out.push(json!({"name": n, "version": "1", "state": s, "reason": reason}))
                }
                None => out.push(json!({"name": n})),
            }
        }
    }
    Json(out).into_response()
}

async fn load(State(t): State<FakeTriton>, Path(name): Path<String>) -> Response {
    t.inner.loads.fetch_add(1, Ordering::SeqCst);
    let dir = t.inner.repository.join(&name);
    if name.contains('/') || name.contains("..") || !dir.is_dir() {
        return triton_error(
            StatusCode::BAD_REQUEST,
            format!("failed to load '{name}', failed to poll from model repository"),
        );
    }
    let gpus = match check_entry(&dir, t.inner.gpus) {
        Ok(gpus) => gpus,
        Err(reason) => {
            if let Ok(mut s) = t.inner.states.lock() {
                s.insert(name.clone(), ("UNAVAILABLE", reason.clone()));
            }
            return triton_error(
                StatusCode::BAD_REQUEST,
                format!("failed to load '{name}': {reason}"),
            );
        }
    };
    if let Ok(mut s) = t.inner.states.lock() {
        s.insert(name.clone(), ("LOADING", String::new()));
    }
    if let Ok(mut p) = t.inner.placed.lock() {
        p.insert(name.clone(), gpus);
    }
    tokio::time::sleep(t.inner.load_delay).await;
    let _ = t.inner.sim.unload_model(&name);
    if let Err(e) =
        t.inner.sim.load_model(SimModel { memory_mb: 0, ..SimModel::new(name.clone(), "gpu0") })
    {
        return triton_error(StatusCode::BAD_REQUEST, format!("failed to load '{name}': {e}"));
    }
    if let Ok(mut s) = t.inner.states.lock() {
        s.insert(name, ("READY", String::new()));
    }
    (StatusCode::OK, Json(json!({}))).into_response()
}

async fn unload(State(t): State<FakeTriton>, Path(name): Path<String>) -> Response {
    let known = t
        .inner
        .states
        .lock()
        .map(|mut s| s.insert(name.clone(), ("UNAVAILABLE", "unloaded".into())).is_some())
        .unwrap_or(false);
    t.inner.sim.unload_model(&name);
    if !known {
        return triton_error(
            StatusCode::BAD_REQUEST,
            format!("failed to unload '{name}', no version is available"),
        );
    }
    (StatusCode::OK, Json(json!({}))).into_response()
}

async fn ready(State(t): State<FakeTriton>, Path(name): Path<String>) -> StatusCode {
    match t.inner.states.lock().ok().and_then(|s| s.get(&name).map(|(st, _)| *st)) {
        Some("READY") => StatusCode::OK,
        _ => StatusCode::BAD_REQUEST,
    }
}

/// A protobuf text-format value: as much of the grammar as model configurations use.
#[derive(Debug, Clone, PartialEq)]
pub enum PbValue {
    /// A string (unquoted), number, enum name or bool.
    Scalar(String),
    Message(Vec<(String, PbValue)>),
    List(Vec<PbValue>),
}

impl PbValue {
    fn field<'a>(fields: &'a [(String, PbValue)], key: &str) -> Vec<&'a PbValue> {
        fields
            .iter()
            .filter(|(k, _)| k == key)
            .flat_map(|(_, v)| match v {
                PbValue::List(items) => items.iter().collect(),
                v => vec![v],
            })
            .collect()
    }

    fn scalar(&self) -> Option<&str> {
        match self {
            PbValue::Scalar(s) => Some(s),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    Str(String),
    Num(String),
    Punct(char),
}

fn tokenize(text: &str) -> Result<Vec<Token>, String> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
        } else if c == '#' {
            while chars.next().is_some_and(|c| c != '\n') {}
        } else if c.is_ascii_alphabetic() || c == '_' {
            let mut s = String::new();
            while let Some(&c) = chars.peek().filter(|c| c.is_ascii_alphanumeric() || **c == '_') {
                s.push(c);
                chars.next();
            }
            out.push(Token::Ident(s));
        } else if c.is_ascii_digit() || c == '-' || c == '+' || c == '.' {
            let mut s = String::new();
            while let Some(&c) =
                chars.peek().filter(|c| c.is_ascii_alphanumeric() || matches!(**c, '-' | '+' | '.'))
            {
                s.push(c);
                chars.next();
            }
            out.push(Token::Num(s));
        } else if c == '"' || c == '\'' {
            chars.next();
            let mut s = String::new();
            loop {
                match chars.next() {
                    None | Some('\n') => return Err("unterminated string".into()),
                    Some(q) if q == c => break,
                    Some('\\') => match chars.next() {
                        Some('n') => s.push('\n'),
                        Some('t') => s.push('\t'),
                        Some(e @ ('"' | '\'' | '\\')) => s.push(e),
                        other => return Err(format!("unknown escape \\{other:?}")),
                    },
                    Some(ch) => s.push(ch),
                }
            }
            out.push(Token::Str(s));
        } else if "{}[]:,;<>".contains(c) {
            out.push(Token::Punct(c));
            chars.next();
        } else {
            return Err(format!("unexpected character {c:?}"));
        }
    }
    Ok(out)
}

struct PbParser {
    tokens: Vec<Token>,
    at: usize,
}

impl PbParser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at)
    }

    fn next(&mut self) -> Option<Token> {
        let t = self.tokens.get(self.at).cloned();
        self.at += 1;
        t
    }

    fn eat(&mut self, p: char) -> bool {
        if self.peek() == Some(&Token::Punct(p)) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    /// Fields until `end` (or the end of input when `None`).
    fn message(
        &mut self,
        end: Option<char>,
        depth: usize,
    ) -> Result<Vec<(String, PbValue)>, String> {
        if depth > 32 {
            return Err("nested too deeply".into());
        }
        let mut fields = Vec::new();
        loop {
            match (self.peek(), end) {
                (None, None) => return Ok(fields),
                (None, Some(e)) => return Err(format!("expected `{e}`, found the end")),
                (Some(Token::Punct(p)), Some(e)) if *p == e => {
                    self.at += 1;
                    return Ok(fields);
                }
                _ => {}
            }
            let Some(Token::Ident(key)) = self.next() else {
                return Err(format!("expected a field name at token {}", self.at));
            };
            let colon = self.eat(':');
            let value = self.value(colon, depth)?;
            fields.push((key, value));
            let _ = self.eat(',') || self.eat(';');
        }
    }

    fn value(&mut self, colon: bool, depth: usize) -> Result<PbValue, String> {
        match self.next() {
            Some(Token::Punct('{')) => Ok(PbValue::Message(self.message(Some('}'), depth + 1)?)),
            Some(Token::Punct('<')) => Ok(PbValue::Message(self.message(Some('>'), depth + 1)?)),
            Some(Token::Punct('[')) => {
                let mut items = Vec::new();
                if self.eat(']') {
                    return Ok(PbValue::List(items));
                }
                loop {
                    items.push(self.value(true, depth + 1)?);
                    if self.eat(']') {
                        return Ok(PbValue::List(items));
                    }
                    if !self.eat(',') {
                        return Err("expected `,` or `]` in a list".into());
                    }
                }
            }
            Some(Token::Str(s)) if colon => {
                // Adjacent strings concatenate.
                let mut s = s;
                while let Some(Token::Str(more)) = self.peek().cloned() {
                    s.push_str(&more);
                    self.at += 1;
                }
                Ok(PbValue::Scalar(s))
            }
            Some(Token::Num(n)) if colon => Ok(PbValue::Scalar(n)),
            Some(Token::Ident(i)) if colon => Ok(PbValue::Scalar(i)),
            other => Err(format!("unexpected {other:?} for a value")),
        }
    }
}

/// Parses protobuf text format into its top-level fields.
pub fn parse_pbtxt(text: &str) -> Result<Vec<(String, PbValue)>, String> {
    let mut p = PbParser { tokens: tokenize(text)?, at: 0 };
    p.message(None, 0)
}

/// ModelConfig's top-level fields (Triton's `model_config.proto`).
const MODEL_CONFIG_FIELDS: &[&str] = &[
    "name",
    "platform",
    "backend",
    "runtime",
    "version_policy",
    "max_batch_size",
    "input",
    "output",
    "batch_input",
    "batch_output",
    "optimization",
    "dynamic_batching",
    "sequence_batching",
    "ensemble_scheduling",
    "instance_group",
    "default_model_filename",
    "cc_model_filenames",
    "metric_tags",
    "parameters",
    "model_warmup",
    "model_operations",
    "model_transaction_policy",
    "model_repository_agents",
    "response_cache",
    "model_metrics",
];

/// The backends this Triton has, and the file each loads from a version directory.
const BACKENDS: &[(&str, &str)] = &[
    ("onnxruntime", "model.onnx"),
    ("vllm", "model.json"),
    ("python", "model.py"),
    ("tensorrt", "model.plan"),
    ("pytorch", "model.pt"),
];

/// Checks the repository entry `dir` as Triton does when it loads it (see the module
/// documentation); Ok: the GPU ids its instance groups are placed on.
pub fn check_entry(dir: &std::path::Path, gpus: u32) -> Result<Vec<u32>, String> {
    let dir_name = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
    let config_path = dir.join("config.pbtxt");
    let text = std::fs::read_to_string(&config_path)
        .map_err(|e| format!("failed to read text proto from {}: {e}", config_path.display()))?;
    let fields = parse_pbtxt(&text)
        .map_err(|e| format!("failed to read text proto from {}: {e}", config_path.display()))?;
    if let Some((k, _)) = fields.iter().find(|(k, _)| !MODEL_CONFIG_FIELDS.contains(&k.as_str())) {
        return Err(format!("Message type \"inference.ModelConfig\" has no field named \"{k}\""));
    }
    let one = |key: &str| {
        PbValue::field(&fields, key).first().and_then(|v| v.scalar()).map(str::to_owned)
    };
    if let Some(name) = one("name")
        && name != dir_name
    {
        return Err(format!(
            "unexpected directory name '{dir_name}' for model '{name}', directory name must equal model name"
        ));
    }
    let mut versions: Vec<u64> = std::fs::read_dir(dir)
        .map_err(|e| e.to_string())?
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u64>().ok()))
        .collect();
    versions.sort_unstable();
    let Some(latest) = versions.last() else {
        return Err(format!(
            "at least one version must be available under the version policy of model '{dir_name}'"
        ));
    };
    let version_dir = dir.join(latest.to_string());
    let backend = match (one("backend"), one("platform").as_deref()) {
        (Some(b), _) => b,
        (None, Some("onnxruntime_onnx")) => "onnxruntime".into(),
        (None, Some("tensorrt_plan")) => "tensorrt".into(),
        (None, Some("pytorch_libtorch")) => "pytorch".into(),
        (None, Some(p)) => return Err(format!("unexpected platform type '{p}' for {dir_name}")),
        // Auto-complete: the backend whose default model file is there.
        (None, None) => BACKENDS
            .iter()
            .find(|(_, file)| version_dir.join(file).exists())
            .map(|(b, _)| (*b).to_owned())
            .ok_or_else(|| format!("unable to determine the backend of model '{dir_name}'"))?,
    };
    let Some((_, default_file)) = BACKENDS.iter().find(|(b, _)| *b == backend) else {
        return Err(format!("unable to find backend library for backend '{backend}'"));
    };
    let file = one("default_model_filename").unwrap_or_else(|| (*default_file).to_owned());
    let model_file = version_dir.join(&file);
    if !model_file.is_file() {
        return Err(format!("unable to find '{}' for model '{dir_name}'", model_file.display()));
    }
    if backend == "vllm" {
        let decoupled = PbValue::field(&fields, "model_transaction_policy")
            .into_iter()
            .filter_map(|v| match v {
                PbValue::Message(m) => PbValue::field(m, "decoupled")
                    .first()
                    .and_then(|d| d.scalar())
                    .map(str::to_owned),
                _ => None,
            })
            .next();
        if decoupled.is_some_and(|d| d == "false" || d == "False") {
            return Err(
                "vLLM Triton backend must be configured to use decoupled model transaction policy"
                    .into(),
            );
        }
        let args: serde_json::Value = std::fs::read(&model_file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| {
                format!("{} is not a JSON object of engine arguments", model_file.display())
            })?;
        let weights =
            args.get("model").and_then(|m| m.as_str()).ok_or("model.json names no `model`")?;
        // vLLM opens the checkpoint directory by the path as given.
        if !std::path::Path::new(weights).join("config.json").is_file() {
            return Err(format!(
                "vLLM: `{weights}` is not a checkpoint directory (no config.json)"
            ));
        }
    }
    let mut placed = Vec::new();
    for group in PbValue::field(&fields, "instance_group") {
        let PbValue::Message(g) = group else {
            return Err("instance_group is not a message".into());
        };
        let kind = PbValue::field(g, "kind")
            .first()
            .and_then(|k| k.scalar())
            .unwrap_or("KIND_AUTO")
            .to_owned();
        let ids: Vec<&str> = PbValue::field(g, "gpus").iter().filter_map(|v| v.scalar()).collect();
        if kind == "KIND_CPU" || kind == "KIND_MODEL" {
            continue;
        }
        let ids: Vec<u32> = if ids.is_empty() {
            (0..gpus).collect()
        } else {
            ids.iter()
                .map(|i| i.parse::<u32>().map_err(|_| format!("bad gpu id {i}")))
                .collect::<Result<_, _>>()?
        };
        let all: Vec<String> = (0..gpus).map(|g| g.to_string()).collect();
        if let Some(bad) = ids.iter().find(|i| **i >= gpus) {
            return Err(format!(
                "instance group of model '{dir_name}' specifies invalid or unsupported gpu id {bad}. GPUs with at least the minimum required CUDA compute compatibility of 6.0 are: {}",
                all.join(" ")
            ));
        }
        placed.extend(ids);
    }
    Ok(placed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_configs_parse_as_protobuf_text() {
        let cfg = "# c\nname: \"m\"\nbackend: 'vllm'\nmax_batch_size: 0\n\
                   model_transaction_policy { decoupled: true }\n\
                   input [ { name: \"a\" data_type: TYPE_STRING dims: [ 1 ] }, { name: \"b\", dims: [-1] } ]\n\
                   instance_group [ { count: 1 kind: KIND_GPU gpus: [ 0, 1 ] } ]";
        let f = parse_pbtxt(cfg).unwrap();
        assert_eq!(f.len(), 6);
        assert_eq!(PbValue::field(&f, "backend")[0].scalar(), Some("vllm"));
        assert_eq!(PbValue::field(&f, "input").len(), 2);
        for bad in ["name \"m\"", "name: \"m", "input [ { name: \"a\" ", "a: }", "x: [1 2]"] {
            assert!(parse_pbtxt(bad).is_err(), "{bad}");
        }
    }
}
