//! The voice-agent routes: transcription, translation, speech and embeddings, OpenAI-shaped.
//!
//! - `POST /v1/audio/transcriptions` and `/v1/audio/translations`: `multipart/form-data`
//!   with `file` and `model` (required), `language` (transcriptions only; translation is
//!   transcription as `en`), `response_format` `json` (default) | `text` | `verbose_json` |
//!   `srt` | `vtt`; `stream` `true` (transcriptions, json or text: OpenAI's server-sent
//!   events, `transcript.text.delta` per word as it is decoded, then `transcript.text.done`);
//!   `prompt`, `temperature`, `timestamp_granularities[]` and other fields are accepted and
//!   ignored.
//! - `POST /v1/audio/speech`: JSON `model`, `input`, `voice`, `response_format` `wav`
//!   (default: the simulator cannot make OpenAI's default mp3) | `pcm` (others: 400 naming
//!   the field), `speed` 0.25–4 (accepted, ignored), `instructions` ignored, `stream_format`
//!   `audio` only. The answer waits for the first chunk (an error before it is a clean
//!   error response), then streams the audio chunk by chunk (`audio/wav` or `audio/pcm`,
//!   chunked). A failure after that aborts the body, as a real backend's broken stream does.
//! - `POST /v1/embeddings`: JSON `model`, `input` (a string or an array of strings; token
//!   arrays are a 400), `dimensions`, `encoding_format` `float` | `base64` (little-endian
//!   f32s), `user` ignored; OpenAI's list shape with `usage`.

use axum::body::Body;
use axum::extract::State;
use axum::extract::multipart::{Multipart, MultipartError, MultipartRejection};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use edgeroute_proto::ErrorBody;
use edgeroute_proto::audio::TranscriptFormat;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{ApiError, AppState, MAX_BODY_BYTES, json_response, read_json};
use crate::audio::{AudioFormat, Transcript};
use crate::embed::embedding_tokens;
use crate::error::SimError;
use axum::extract::rejection::BytesRejection;

/// The longest text form field read (`model`, `language`, `response_format`…).
const MAX_TEXT_FIELD: usize = 4096;

const TEXT: HeaderValue = HeaderValue::from_static("text/plain; charset=utf-8");

/// Which audio route: the `task` of `verbose_json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Task {
    Transcribe,
    Translate,
}

/// The fields of an audio form this server reads.
#[derive(Debug, Default)]
struct AudioForm {
    file: Option<Bytes>,
    model: Option<String>,
    language: Option<String>,
    response_format: Option<String>,
    stream: Option<String>,
}

fn from_multipart(e: &MultipartError) -> ApiError {
    let status = e.status();
    let (message, code) = if status == StatusCode::PAYLOAD_TOO_LARGE {
        (format!("Request body exceeds the limit of {MAX_BODY_BYTES} bytes."), "request_too_large")
    } else {
        (format!("Could not read the multipart form: {}", e.body_text()), "invalid_body")
    };
    ApiError {
        status,
        body: ErrorBody::new(message, "invalid_request_error", None, Some(code)),
        retry_after_s: None,
    }
}

/// Reads the form, keeping the last value of each known field and skipping the rest.
async fn read_form(mut mp: Multipart) -> Result<AudioForm, ApiError> {
    let mut form = AudioForm::default();
    while let Some(field) = mp.next_field().await.map_err(|e| from_multipart(&e))? {
        let name = field.name().unwrap_or_default().to_owned();
        match name.as_str() {
            "file" => form.file = Some(field.bytes().await.map_err(|e| from_multipart(&e))?),
            "model" | "language" | "response_format" | "stream" => {
                let bytes = field.bytes().await.map_err(|e| from_multipart(&e))?;
                let param = Some(name.clone());
                if bytes.len() > MAX_TEXT_FIELD {
                    let msg = format!("`{name}` is longer than {MAX_TEXT_FIELD} bytes.");
                    return Err(ApiError::invalid(msg, param));
                }
                let Ok(text) = String::from_utf8(bytes.to_vec()) else {
                    return Err(ApiError::invalid(format!("`{name}` is not UTF-8."), param));
                };
                let slot = match name.as_str() {
                    "model" => &mut form.model,
                    "language" => &mut form.language,
                    "stream" => &mut form.stream,
                    _ => &mut form.response_format,
                };
                *slot = Some(text);
            }
            // Accepted and ignored: prompt, temperature, timestamp_granularities[], …
            _ => {}
        }
    }
    Ok(form)
}

pub(super) async fn transcriptions(
    State(st): State<AppState>,
    mp: Result<Multipart, MultipartRejection>,
) -> Response {
    audio(st, mp, Task::Transcribe).await
}

pub(super) async fn translations(
    State(st): State<AppState>,
    mp: Result<Multipart, MultipartRejection>,
) -> Response {
    audio(st, mp, Task::Translate).await
}

async fn audio(st: AppState, mp: Result<Multipart, MultipartRejection>, task: Task) -> Response {
    let mp = match mp {
        Ok(mp) => mp,
        Err(e) => {
            let msg = format!("Expected a multipart/form-data body: {}", e.body_text());
            return ApiError::invalid(msg, None).into_response();
        }
    };
    let form = match read_form(mp).await {
        Ok(f) => f,
        Err(e) => return e.into_response(),
    };
    let format = match form.response_format.as_deref() {
        None => TranscriptFormat::Json,
        Some(f) => match TranscriptFormat::parse(f) {
            Some(f) => f,
            None => {
                let msg = format!(
                    "Unsupported response_format `{}`: use json, text, verbose_json, srt or vtt.",
                    f.escape_debug()
                );
                return ApiError::invalid(msg, Some("response_format".into())).into_response();
            }
        },
    };
    let Some(model) = form.model else {
        return ApiError::invalid("Missing required parameter: 'model'.", Some("model".into()))
            .into_response();
    };
    let Some(file) = form.file else {
        return ApiError::invalid("Missing required parameter: 'file'.", Some("file".into()))
            .into_response();
    };
    let language = match task {
        Task::Transcribe => form.language.as_deref(),
        Task::Translate => Some("en"),
    };
    let stream = match form.stream.as_deref() {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => {
            return ApiError::invalid("`stream` is true or false.", Some("stream".into()))
                .into_response();
        }
    };
    if stream {
        if task == Task::Translate
            || !matches!(format, TranscriptFormat::Json | TranscriptFormat::Text)
        {
            let msg = "Streaming is for transcriptions with response_format json or text.";
            return ApiError::invalid(msg, Some("stream".into())).into_response();
        }
        return streamed_transcript(st, &model, &file, language).await;
    }
    match st.sim.transcribe(&model, &file, language).await {
        Ok(t) => transcript_response(&t, format, task),
        Err(e) => ApiError::from_sim(&e).into_response(),
    }
}

/// A transcription as server-sent events (`transcript.text.delta` per word, then
/// `transcript.text.done`), sent from its first word on: an error before it is a clean error
/// response, one after it ends the stream.
async fn streamed_transcript(
    st: AppState,
    model: &str,
    file: &[u8],
    language: Option<&str>,
) -> Response {
    let stream = match st.sim.transcribe_stream(model, file, language) {
        Ok(s) => s,
        Err(e) => return ApiError::from_sim(&e).into_response(),
    };
    let mut events = Box::pin(crate::engine::transcript_sse(stream));
    let first = match events.next().await {
        Some(Ok(b)) => b,
        Some(Err(e)) => return ApiError::from_sim(&e).into_response(),
        None => return ApiError::from_sim(&SimError::Crashed).into_response(),
    };
    let body = futures_util::stream::once(async move { Ok::<_, SimError>(first) }).chain(events);
    let mut resp = Response::new(Body::from_stream(body));
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    resp.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// `verbose_json`'s shape: OpenAI's, with fixed values for what the simulator does not model.
#[derive(Serialize)]
struct Verbose<'a> {
    task: &'static str,
    language: &'a str,
    duration: f64,
    text: &'a str,
    segments: Vec<VerboseSegment<'a>>,
}

#[derive(Serialize)]
struct VerboseSegment<'a> {
    id: u32,
    seek: u32,
    start: f64,
    end: f64,
    text: &'a str,
    tokens: [u32; 0],
    temperature: f64,
    avg_logprob: f64,
    compression_ratio: f64,
    no_speech_prob: f64,
}

fn text_response(body: String) -> Response {
    let mut resp = Response::new(Body::from(body));
    resp.headers_mut().insert(CONTENT_TYPE, TEXT);
    resp
}

/// `secs` as `HH:MM:SS<sep>mmm`, rounded to the millisecond.
fn timestamp(secs: f64, sep: char) -> String {
    let ms = (secs.max(0.0) * 1000.0).round() as u64;
    let (h, m, s, ms) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000);
    format!("{h:02}:{m:02}:{s:02}{sep}{ms:03}")
}

fn transcript_response(t: &Transcript, format: TranscriptFormat, task: Task) -> Response {
    match format {
        TranscriptFormat::Json => {
            json_response(StatusCode::OK, &serde_json::json!({ "text": t.text }))
        }
        TranscriptFormat::Text => text_response(t.text.clone()),
        TranscriptFormat::VerboseJson => {
            let segments = t
                .segments
                .iter()
                .map(|s| VerboseSegment {
                    id: s.id,
                    // Whisper's seek is in 10 ms frames.
                    seek: (s.start * 100.0) as u32,
                    start: s.start,
                    end: s.end,
                    text: &s.text,
                    tokens: [],
                    temperature: 0.0,
                    avg_logprob: -0.25,
                    compression_ratio: 1.5,
                    no_speech_prob: 0.01,
                })
                .collect();
            let body = Verbose {
                task: match task {
                    Task::Transcribe => "transcribe",
                    Task::Translate => "translate",
                },
                language: &t.language,
                duration: t.duration_s,
                text: &t.text,
                segments,
            };
            json_response(StatusCode::OK, &body)
        }
        TranscriptFormat::Srt => {
            let mut out = String::new();
            for (i, s) in t.segments.iter().enumerate() {
                out.push_str(&format!(
                    "{}\n{} --> {}\n{}\n\n",
                    i + 1,
                    timestamp(s.start, ','),
                    timestamp(s.end, ','),
                    s.text
                ));
            }
            text_response(out)
        }
        TranscriptFormat::Vtt => {
            let mut out = String::from("WEBVTT\n\n");
            for s in &t.segments {
                out.push_str(&format!(
                    "{} --> {}\n{}\n\n",
                    timestamp(s.start, '.'),
                    timestamp(s.end, '.'),
                    s.text
                ));
            }
            text_response(out)
        }
    }
}

/// `POST /v1/audio/speech`'s body. Unknown fields are ignored, as OpenAI's additions
/// should not break the simulator.
#[derive(Debug, Deserialize)]
struct SpeechRequest {
    model: String,
    input: String,
    voice: String,
    #[serde(default)]
    response_format: Option<String>,
    #[serde(default)]
    speed: Option<f64>,
    #[serde(default)]
    stream_format: Option<String>,
}

pub(super) async fn speech(
    State(st): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let req: SpeechRequest = match read_json(body) {
        Ok(r) => r,
        Err(refusal) => return refusal,
    };
    let format = match req.response_format.as_deref() {
        None | Some("wav") => AudioFormat::Wav,
        Some("pcm") => AudioFormat::Pcm,
        Some(f) => {
            let msg = format!(
                "Unsupported response_format `{}`: this server produces wav or pcm.",
                f.escape_debug()
            );
            return ApiError::invalid(msg, Some("response_format".into())).into_response();
        }
    };
    if let Some(speed) = req.speed
        && !(0.25..=4.0).contains(&speed)
    {
        let msg = format!("`speed` must be between 0.25 and 4.0; got {speed}.");
        return ApiError::invalid(msg, Some("speed".into())).into_response();
    }
    if let Some(f) = req.stream_format.as_deref()
        && f != "audio"
    {
        let msg = format!("Unsupported stream_format `{}`: use audio.", f.escape_debug());
        return ApiError::invalid(msg, Some("stream_format".into())).into_response();
    }
    let mut stream = match st.sim.speech(&req.model, &req.input, &req.voice, format) {
        Ok(s) => s,
        Err(e) => return ApiError::from_sim(&e).into_response(),
    };
    // The commit point: nothing is sent until the first audio is ready.
    let first = match stream.next().await {
        Some(Ok(b)) => b,
        Some(Err(e)) => return ApiError::from_sim(&e).into_response(),
        // A speech stream yields its first chunk or an error; treat anything else as a crash.
        None => return ApiError::from_sim(&SimError::Crashed).into_response(),
    };
    let body = futures_util::stream::once(async move { Ok::<_, SimError>(first) }).chain(stream);
    let mut resp = Response::new(Body::from_stream(body));
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(format.content_type()));
    resp.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// `POST /v1/embeddings`' body. `input` is checked by hand to tell token arrays apart.
#[derive(Debug, Deserialize)]
struct EmbeddingsRequest {
    model: String,
    input: Value,
    #[serde(default)]
    dimensions: Option<u32>,
    #[serde(default)]
    encoding_format: Option<String>,
}

/// The texts of `input`: a string, or an array of strings.
fn embedding_inputs(input: Value) -> Result<Vec<String>, ApiError> {
    let param = || Some("input".to_owned());
    match input {
        Value::String(s) => Ok(vec![s]),
        Value::Array(items) => items
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                Value::Number(_) | Value::Array(_) => Err(ApiError::invalid(
                    "Token arrays are not supported by this server: send `input` as text.",
                    param(),
                )),
                _ => Err(ApiError::invalid(
                    "`input` must be a string or an array of strings.",
                    param(),
                )),
            })
            .collect(),
        _ => Err(ApiError::invalid("`input` must be a string or an array of strings.", param())),
    }
}

#[derive(Serialize)]
#[serde(untagged)]
enum EmbeddingValue {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Serialize)]
struct EmbeddingItem {
    object: &'static str,
    index: usize,
    embedding: EmbeddingValue,
}

#[derive(Serialize)]
struct EmbeddingUsage {
    prompt_tokens: u32,
    total_tokens: u32,
}

#[derive(Serialize)]
struct EmbeddingList {
    object: &'static str,
    data: Vec<EmbeddingItem>,
    model: String,
    usage: EmbeddingUsage,
}

pub(super) async fn embeddings(
    State(st): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let req: EmbeddingsRequest = match read_json(body) {
        Ok(r) => r,
        Err(refusal) => return refusal,
    };
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(f) => {
            let msg =
                format!("Unsupported encoding_format `{}`: use float or base64.", f.escape_debug());
            return ApiError::invalid(msg, Some("encoding_format".into())).into_response();
        }
    };
    let inputs = match embedding_inputs(req.input) {
        Ok(i) => i,
        Err(e) => return e.into_response(),
    };
    let vectors = match st.sim.embed(&req.model, &inputs, req.dimensions).await {
        Ok(v) => v,
        Err(e) => return ApiError::from_sim(&e).into_response(),
    };
    let tokens = inputs.iter().map(|i| embedding_tokens(i)).fold(0u32, u32::saturating_add);
    let data = vectors
        .into_iter()
        .enumerate()
        .map(|(index, v)| EmbeddingItem {
            object: "embedding",
            index,
            embedding: if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                EmbeddingValue::Base64(base64_encode(&bytes))
            } else {
                EmbeddingValue::Float(v)
            },
        })
        .collect();
    let list = EmbeddingList {
        object: "list",
        data,
        model: req.model,
        usage: EmbeddingUsage { prompt_tokens: tokens, total_tokens: tokens },
    };
    json_response(StatusCode::OK, &list)
}

/// Standard base64 with padding (RFC 4648 §4), as OpenAI encodes embeddings.
fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests;
