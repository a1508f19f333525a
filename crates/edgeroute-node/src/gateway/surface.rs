//! `POST /v1/audio/transcriptions`, `/v1/audio/translations`, `/v1/audio/speech`,
//! `/v1/embeddings` and `/v1/completions`: the endpoints beside chat a voice agent uses
//! (issue 19).
//!
//! Each goes the chat route's way: the caller's token (inference scope), the tenant's rate
//! limit, admission from the head (phase, concurrency, tenant share, body budget), the body
//! within its limit and deadline (`limits.max_audio_bytes` for uploads, else
//! `max_body_bytes`), the request checked here with precise 400s naming the field, the model
//! held for the answer (an unload drains it, the answer carries the migrate hint), then the
//! backend up to its first byte (the commit point: before it a clean 5xx the client fails over
//! on; after it a cut body). Time to first byte is recorded per route
//! (`edgeroute_node_first_byte_seconds{route}`: first audio for speech) — apart from chat's
//! TTFT, which routing reads.
//!
//! Uploads are read whole (bounded) before they reach the backend: the model is a form field
//! that may follow the file.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use edgeroute_auth::Scope;
use edgeroute_http::ApiError;
use futures_util::StreamExt;
use http::{HeaderMap, HeaderValue, header};
use serde::Deserialize;

use super::chat::{Admitted, admit, answered, backend_failed, refused};
use super::{AppState, auth, hdr, ratelimit};
use crate::backend::surface::{Endpoint, Parsed, SurfaceCall, TranscriptFormat};
use crate::config::ms;
use crate::telemetry::Outcome;

/// OpenAI's limit on speech input, characters.
pub const MAX_SPEECH_CHARS: usize = 4096;
/// OpenAI's limit on embedding inputs per request.
pub const MAX_EMBEDDING_INPUTS: usize = 2048;
/// Largest `dimensions` asked of an embedding.
pub const MAX_EMBEDDING_DIMENSIONS: u32 = 4096;

/// One endpoint's request (served as a [`super::Route`]: authentication inside, like chat).
pub(super) async fn serve(
    st: AppState,
    scope: Scope,
    endpoint: Endpoint,
    req: Request,
) -> Response {
    let (parts, body) = req.into_parts();
    let tenant = match auth::authenticate(&st, &parts.headers, scope) {
        Ok(t) => t,
        Err(refusal) => return refusal,
    };
    let admitted = match ratelimit::check(&st, &tenant) {
        Ok(a) => a,
        Err(refusal) => return refusal,
    };
    let mut model = None;
    let mut res = match handle(&st, &tenant, endpoint, &parts.headers, body, &mut model).await {
        Ok(res) => res,
        Err(e) => e.into_response(),
    };
    if let Some(model) = model
        && !res.headers().contains_key(hdr::MIGRATE)
        && let Some(hint) = st.models.drain_hint(&model, tokio::time::Instant::now())
        && let Ok(v) = HeaderValue::from_str(&hint.to_string())
    {
        res.headers_mut().insert(hdr::MIGRATE, v);
    }
    st.metrics.request(endpoint.label(), res.status().as_u16());
    admitted.apply(res.headers_mut());
    res
}

async fn handle(
    st: &AppState,
    tenant: &Arc<str>,
    endpoint: Endpoint,
    headers: &HeaderMap,
    body: Body,
    model: &mut Option<String>,
) -> Result<Response, ApiError> {
    let l = &st.limits;
    let limit = if endpoint.is_upload() { l.max_audio_bytes } else { l.max_body_bytes };
    let content_type = headers.get(header::CONTENT_TYPE).cloned();
    // Before the body is read: an upload that is not multipart is refused at once.
    if endpoint.is_upload()
        && !content_type
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("multipart/form-data"))
    {
        st.metrics.reject("invalid_request");
        return Err(ApiError::invalid_request(
            None,
            "Send the audio as multipart/form-data (a `file` part and a `model` field).",
        ));
    }
    let Admitted { started, now, session, hint, slot, tenant_slot, body_room, body } =
        admit(st, tenant, headers, body, limit).await?;
    let parsed = match endpoint {
        Endpoint::Transcriptions | Endpoint::Translations => {
            let ct = content_type.as_ref().and_then(|v| v.to_str().ok()).unwrap_or_default();
            parse_upload(endpoint, ct, body.clone())
                .await
                .and_then(|p| within_duration(p, l.max_audio_seconds))
        }
        Endpoint::Speech => parse_speech(&body),
        Endpoint::Embeddings => parse_embeddings(&body),
        Endpoint::Completions => parse_completions(&body, l.max_output_tokens),
    }
    .map_err(refused(st, "invalid_request"))?;
    *model = Some(parsed.model().to_owned());
    let Some(model_use) = st.models.acquire(parsed.model()) else {
        st.metrics.reject("model_not_found");
        return Err(ApiError::model_not_found(parsed.model()));
    };
    if let Some(s) = session {
        st.sessions.touch(s, now);
    }
    let version = model_use.version.clone();
    let call = SurfaceCall {
        endpoint,
        parsed,
        raw: body,
        content_type: content_type.unwrap_or_else(|| HeaderValue::from_static("application/json")),
    };
    let idle = ms(l.stream_idle_timeout_ms);
    let reply = st.backend.surface(call, idle).await;
    drop(body_room);
    let reply = reply.map_err(|e| backend_failed(st, started, &e))?;
    let first_byte = started.elapsed();
    st.metrics.first_byte(endpoint.label(), first_byte.as_secs_f64());
    // The rest of the body, ending the request's hold on its slots when it ends (or when the
    // client goes away and the body is dropped), each chunk within the idle deadline.
    let st2 = st.clone();
    let held = (slot, tenant_slot, model_use);
    let rest = futures_util::stream::unfold(
        (reply.rest, Some(held), false),
        move |(mut rest, mut held, done)| {
            let st = st2.clone();
            async move {
                if done {
                    return None;
                }
                match tokio::time::timeout(idle, rest.next()).await {
                    Ok(Some(Ok(b))) => Some((Ok::<Bytes, std::io::Error>(b), (rest, held, false))),
                    Ok(None) => {
                        st.telemetry.record(None, started.elapsed(), Outcome::Ok);
                        held.take();
                        None
                    }
                    Ok(Some(Err(e))) => {
                        st.telemetry.record(None, started.elapsed(), Outcome::Failed);
                        st.metrics.backend_error(e.kind());
                        held.take();
                        Some((Err(std::io::Error::other(e.to_string())), (rest, None, true)))
                    }
                    Err(_) => {
                        st.telemetry.record(None, started.elapsed(), Outcome::Failed);
                        held.take();
                        let e = std::io::Error::other("the backend stalled mid-answer");
                        Some((Err(e), (rest, None, true)))
                    }
                }
            }
        },
    );
    let first = futures_util::stream::once(std::future::ready(Ok(reply.first)));
    let mut res = Response::new(Body::from_stream(first.chain(rest)));
    res.headers_mut().insert(header::CONTENT_TYPE, reply.content_type);
    res.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    answered(&mut res, hint, version);
    Ok(res)
}

fn bad(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::invalid_request(Some(param), message.into())
}

fn required(param: &str, v: Option<String>) -> Result<String, ApiError> {
    match v {
        Some(s) if !s.trim().is_empty() => Ok(s),
        _ => Err(bad(param, format!("`{param}` is required."))),
    }
}

#[derive(Deserialize)]
struct SpeechBody {
    model: Option<String>,
    input: Option<String>,
    voice: Option<String>,
    response_format: Option<String>,
    speed: Option<f64>,
}

/// `/v1/audio/speech`'s JSON (other fields pass to an upstream untouched).
pub fn parse_speech(body: &[u8]) -> Result<Parsed, ApiError> {
    let b: SpeechBody = edgeroute_http::json::parse_json(body)?;
    let model = required("model", b.model)?;
    let input = required("input", b.input)?;
    if input.chars().count() > MAX_SPEECH_CHARS {
        return Err(bad("input", format!("At most {MAX_SPEECH_CHARS} characters.")));
    }
    let voice = required("voice", b.voice)?;
    let format = b.response_format;
    if format.as_deref().is_some_and(|f| !["mp3", "opus", "aac", "flac", "wav", "pcm"].contains(&f))
    {
        return Err(bad("response_format", "One of mp3, opus, aac, flac, wav, pcm."));
    }
    if let Some(s) = b.speed
        && !(0.25..=4.0).contains(&s)
    {
        return Err(bad("speed", "Between 0.25 and 4.0."));
    }
    Ok(Parsed::Speech { model, input, voice, format })
}

#[derive(Deserialize)]
struct EmbeddingsBody {
    model: Option<String>,
    input: Option<serde_json::Value>,
    dimensions: Option<u32>,
    encoding_format: Option<String>,
}

/// `/v1/embeddings`'s JSON: `input` a string, strings, tokens or token arrays.
pub fn parse_embeddings(body: &[u8]) -> Result<Parsed, ApiError> {
    use serde_json::Value;
    let b: EmbeddingsBody = edgeroute_http::json::parse_json(body)?;
    let model = required("model", b.model)?;
    let tokens = |v: &[Value]| -> Option<String> {
        let ids: Option<Vec<String>> =
            v.iter().map(|t| t.as_u64().map(|n| n.to_string())).collect();
        ids.filter(|i| !i.is_empty()).map(|i| i.join(" "))
    };
    let inputs: Vec<String> = match b.input {
        Some(Value::String(s)) => vec![s],
        Some(Value::Array(items)) if items.iter().all(Value::is_string) => {
            items.into_iter().filter_map(|v| v.as_str().map(str::to_owned)).collect()
        }
        Some(Value::Array(items)) if items.iter().all(Value::is_u64) => {
            vec![tokens(&items).ok_or_else(|| bad("input", "An empty token array."))?]
        }
        Some(Value::Array(items)) if items.iter().all(Value::is_array) => items
            .iter()
            .map(|a| {
                a.as_array().and_then(|a| tokens(a)).ok_or_else(|| {
                    bad("input", "Each token array must hold non-negative integers.")
                })
            })
            .collect::<Result<_, _>>()?,
        None => return Err(bad("input", "`input` is required.")),
        Some(_) => {
            return Err(bad("input", "A string, an array of strings, or token arrays."));
        }
    };
    if inputs.is_empty() || inputs.len() > MAX_EMBEDDING_INPUTS {
        return Err(bad("input", format!("1 to {MAX_EMBEDDING_INPUTS} inputs.")));
    }
    if let Some(i) = inputs.iter().position(String::is_empty) {
        return Err(bad("input", format!("Input {i} is empty.")));
    }
    if let Some(d) = b.dimensions
        && !(1..=MAX_EMBEDDING_DIMENSIONS).contains(&d)
    {
        return Err(bad("dimensions", format!("Between 1 and {MAX_EMBEDDING_DIMENSIONS}.")));
    }
    let base64 = match b.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(_) => return Err(bad("encoding_format", "`float` or `base64`.")),
    };
    Ok(Parsed::Embed { model, inputs, dimensions: b.dimensions, base64 })
}

#[derive(Deserialize)]
struct CompletionsBody {
    model: Option<String>,
    prompt: Option<serde_json::Value>,
    max_tokens: Option<u32>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<serde_json::Value>,
}

/// `max_tokens` when a completion sets none: OpenAI's and vLLM's default.
pub const DEFAULT_COMPLETION_TOKENS: u32 = 16;

/// `/v1/completions`' JSON: one prompt (a string, or an array of one string), `max_tokens`
/// within the node's `max_output_tokens`.
pub fn parse_completions(body: &[u8], max_output_tokens: u32) -> Result<Parsed, ApiError> {
    use serde_json::Value;
    let b: CompletionsBody = edgeroute_http::json::parse_json(body)?;
    let model = required("model", b.model)?;
    let prompt = match b.prompt {
        Some(Value::String(s)) => s,
        Some(Value::Array(mut items)) if items.len() == 1 && items[0].is_string() => {
            items.pop().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
        }
        None => return Err(bad("prompt", "`prompt` is required.")),
        Some(_) => return Err(bad("prompt", "One prompt: a string, or an array of one string.")),
    };
    let max_tokens = b.max_tokens.unwrap_or(DEFAULT_COMPLETION_TOKENS);
    if !(1..=max_output_tokens).contains(&max_tokens) {
        return Err(bad("max_tokens", format!("Between 1 and {max_output_tokens}.")));
    }
    let include_usage = b
        .stream_options
        .as_ref()
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    Ok(Parsed::Complete { model, prompt, max_tokens, stream: b.stream, include_usage })
}

/// Fields of a transcription form read, at most (a form is a handful).
const MAX_FORM_FIELDS: usize = 32;
/// Largest text field of the form, bytes.
const MAX_FIELD_BYTES: usize = 64 * 1024;

/// `/v1/audio/transcriptions` and `/translations`: the multipart form, already bounded.
pub async fn parse_upload(
    endpoint: Endpoint,
    content_type: &str,
    body: Bytes,
) -> Result<Parsed, ApiError> {
    let boundary = multer::parse_boundary(content_type)
        .map_err(|_| bad("file", "multipart/form-data without a boundary."))?;
    let stream =
        futures_util::stream::once(std::future::ready(Ok::<Bytes, std::convert::Infallible>(body)));
    let mut form = multer::Multipart::new(stream, boundary);
    let (mut model, mut audio, mut language, mut format) = (None, None, None, None);
    let mut stream = None;
    let mut fields = 0;
    let malformed = |e: multer::Error| bad("file", format!("A malformed multipart form: {e}"));
    while let Some(field) = form.next_field().await.map_err(malformed)? {
        fields += 1;
        if fields > MAX_FORM_FIELDS {
            return Err(bad("file", format!("At most {MAX_FORM_FIELDS} form fields.")));
        }
        let name = field.name().unwrap_or_default().to_owned();
        if name == "file" {
            audio = Some(field.bytes().await.map_err(malformed)?);
            continue;
        }
        let value = field.bytes().await.map_err(malformed)?;
        if value.len() > MAX_FIELD_BYTES {
            return Err(bad(&name, format!("At most {MAX_FIELD_BYTES} bytes.")));
        }
        let text = String::from_utf8(value.to_vec())
            .map_err(|_| bad(&name, format!("`{name}` is not UTF-8 text.")))?;
        match name.as_str() {
            "model" => model = Some(text),
            "language" => language = Some(text),
            "response_format" => format = Some(text),
            "stream" => stream = Some(text),
            // prompt, temperature, timestamp_granularities[], …: for the backend.
            _ => {}
        }
    }
    let model = required("model", model)?;
    let audio = match audio {
        Some(a) if !a.is_empty() => a,
        _ => return Err(bad("file", "`file` is required: the audio to transcribe.")),
    };
    let format = match format.as_deref() {
        None => TranscriptFormat::Json,
        Some(f) => TranscriptFormat::parse(f)
            .ok_or_else(|| bad("response_format", "One of json, text, srt, verbose_json, vtt."))?,
    };
    if let Some(l) = &language
        && !(2..=8).contains(&l.len())
    {
        return Err(bad("language", "An ISO-639-1 code such as `en`."));
    }
    let translate = endpoint == Endpoint::Translations;
    let stream = match stream.as_deref() {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => return Err(bad("stream", "`stream` is true or false.")),
    };
    if stream && (translate || !matches!(format, TranscriptFormat::Json | TranscriptFormat::Text)) {
        return Err(bad(
            "stream",
            "Streaming is for transcriptions with response_format json or text.",
        ));
    }
    Ok(Parsed::Transcribe { model, audio, language, format, translate, stream })
}

/// An upload whose audio is a WAV longer than `max_s` is refused (the header says how long;
/// other formats would need decoding and are left to the backend).
fn within_duration(p: Parsed, max_s: u32) -> Result<Parsed, ApiError> {
    if let Parsed::Transcribe { audio, .. } = &p
        && audio.starts_with(b"RIFF")
        && let Ok(info) = edgeroute_sim::audio::parse_wav(audio)
        && info.duration_s() > f64::from(max_s)
    {
        return Err(bad(
            "file",
            format!(
                "The audio lasts {:.1} s; this node takes at most {max_s} s \
                 (limits.max_audio_seconds).",
                info.duration_s()
            ),
        )
        .with_code("audio_too_long"));
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

    use super::*;

    fn param(e: ApiError) -> String {
        let v: serde_json::Value = serde_json::from_slice(&e.body_json()).unwrap();
        v["error"]["param"].as_str().unwrap_or_default().to_owned()
    }

    #[test]
    fn speech_is_checked_field_by_field() {
        let ok = parse_speech(br#"{"model":"tts","input":"hi","voice":"alloy"}"#).unwrap();
        assert!(matches!(ok, Parsed::Speech { format: None, .. }));
        for (body, p) in [
            (r#"{"input":"hi","voice":"a"}"#.to_owned(), "model"),
            (r#"{"model":"t","voice":"a"}"#.to_owned(), "input"),
            (r#"{"model":"t","input":"hi"}"#.to_owned(), "voice"),
            (
                r#"{"model":"t","input":"hi","voice":"a","response_format":"ogg"}"#.to_owned(),
                "response_format",
            ),
            (r#"{"model":"t","input":"hi","voice":"a","speed":9}"#.to_owned(), "speed"),
            (format!(r#"{{"model":"t","input":"{}","voice":"a"}}"#, "x".repeat(4097)), "input"),
        ] {
            assert_eq!(param(parse_speech(body.as_bytes()).unwrap_err()), p, "{body}");
        }
    }

    #[test]
    fn a_completion_is_one_prompt_within_the_ceiling() {
        let ok = parse_completions(br#"{"model":"m","prompt":["hi"],"stream":true,"stream_options":{"include_usage":true}}"#, 100).unwrap();
        assert!(matches!(
            ok,
            Parsed::Complete { max_tokens: 16, stream: true, include_usage: true, .. }
        ));
        for (body, p) in [
            (r#"{"model":"m"}"#, "prompt"),
            (r#"{"model":"m","prompt":["a","b"]}"#, "prompt"),
            (r#"{"model":"m","prompt":[1,2]}"#, "prompt"),
            (r#"{"model":"m","prompt":"a","max_tokens":101}"#, "max_tokens"),
            (r#"{"prompt":"a"}"#, "model"),
        ] {
            assert_eq!(param(parse_completions(body.as_bytes(), 100).unwrap_err()), p, "{body}");
        }
    }

    #[test]
    fn embeddings_take_strings_or_tokens() {
        let one = parse_embeddings(br#"{"model":"e","input":"hi"}"#).unwrap();
        assert!(
            matches!(one, Parsed::Embed { ref inputs, base64: false, .. } if inputs == &["hi"])
        );
        let toks =
            parse_embeddings(br#"{"model":"e","input":[[1,2],[3]],"encoding_format":"base64"}"#)
                .unwrap();
        assert!(
            matches!(toks, Parsed::Embed { ref inputs, base64: true, .. } if inputs.len() == 2)
        );
        for (body, p) in [
            (r#"{"model":"e"}"#, "input"),
            (r#"{"model":"e","input":[]}"#, "input"),
            (r#"{"model":"e","input":[""]}"#, "input"),
            (r#"{"model":"e","input":[1,"a"]}"#, "input"),
            (r#"{"model":"e","input":"a","dimensions":0}"#, "dimensions"),
            (r#"{"model":"e","input":"a","encoding_format":"hex"}"#, "encoding_format"),
            (r#"{"input":"a"}"#, "model"),
        ] {
            assert_eq!(param(parse_embeddings(body.as_bytes()).unwrap_err()), p, "{body}");
        }
    }

    fn form(parts: &[(&str, Option<&str>, &[u8])]) -> (String, Bytes) {
        let mut b = Vec::new();
        for (name, filename, value) in parts {
            b.extend_from_slice(b"--XyZ\r\n");
            match filename {
                Some(f) => b.extend_from_slice(
                    format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\nContent-Type: audio/wav\r\n\r\n").as_bytes(),
                ),
                None => b.extend_from_slice(
                    format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
                ),
            }
            b.extend_from_slice(value);
            b.extend_from_slice(b"\r\n");
        }
        b.extend_from_slice(b"--XyZ--\r\n");
        ("multipart/form-data; boundary=XyZ".to_owned(), Bytes::from(b))
    }

    #[test]
    fn a_wav_longer_than_the_limit_is_refused_from_its_header() {
        let samples = vec![0i16; 16_000 * 3];
        let wav = Bytes::from(edgeroute_sim::audio::wav_file(16_000, &samples));
        let p = |audio: Bytes| Parsed::Transcribe {
            model: "w".into(),
            audio,
            language: None,
            format: TranscriptFormat::Json,
            translate: false,
            stream: false,
        };
        assert!(within_duration(p(wav.clone()), 3).is_ok());
        let e = within_duration(p(wav), 2).unwrap_err();
        assert_eq!(e.body.error.code.as_deref(), Some("audio_too_long"));
        // Not a WAV: the backend's to judge.
        assert!(within_duration(p(Bytes::from_static(b"ID3...")), 1).is_ok());
    }

    #[tokio::test]
    async fn a_streamed_transcription_is_json_or_text_and_never_a_translation() {
        let f = |extra: &[(&str, Option<&str>, &[u8])]| {
            let mut parts: Vec<(&str, Option<&str>, &[u8])> =
                vec![("file", Some("a.wav"), b"RIFF"), ("model", None, b"w")];
            parts.extend_from_slice(extra);
            form(&parts)
        };
        let (ct, body) = f(&[("stream", None, b"true")]);
        let p = parse_upload(Endpoint::Transcriptions, &ct, body).await.unwrap();
        assert!(matches!(p, Parsed::Transcribe { stream: true, .. }));
        let (ct, body) = f(&[("stream", None, b"true")]);
        let e = parse_upload(Endpoint::Translations, &ct, body).await.unwrap_err();
        assert_eq!(param(e), "stream");
        let (ct, body) = f(&[("stream", None, b"true"), ("response_format", None, b"srt")]);
        let e = parse_upload(Endpoint::Transcriptions, &ct, body).await.unwrap_err();
        assert_eq!(param(e), "stream");
        let (ct, body) = f(&[("stream", None, b"yes")]);
        let e = parse_upload(Endpoint::Transcriptions, &ct, body).await.unwrap_err();
        assert_eq!(param(e), "stream");
    }

    #[tokio::test]
    async fn an_upload_needs_its_file_and_model_in_any_order() {
        let (ct, body) = form(&[("file", Some("a.wav"), b"RIFF...."), ("model", None, b"whisper")]);
        let p = parse_upload(Endpoint::Translations, &ct, body).await.unwrap();
        assert!(matches!(
            p,
            Parsed::Transcribe { translate: true, format: TranscriptFormat::Json, .. }
        ));
        let (ct, body) = form(&[("model", None, b"whisper")]);
        assert_eq!(
            param(parse_upload(Endpoint::Transcriptions, &ct, body).await.unwrap_err()),
            "file"
        );
        let (ct, body) = form(&[("file", Some("a.wav"), b"x")]);
        assert_eq!(
            param(parse_upload(Endpoint::Transcriptions, &ct, body).await.unwrap_err()),
            "model"
        );
        let (ct, body) = form(&[
            ("file", Some("a"), b"x"),
            ("model", None, b"w"),
            ("response_format", None, b"mp4"),
        ]);
        assert_eq!(
            param(parse_upload(Endpoint::Transcriptions, &ct, body).await.unwrap_err()),
            "response_format"
        );
        // Truncated: a precise 400, never a panic.
        let (ct, body) = form(&[("file", Some("a"), b"x"), ("model", None, b"w")]);
        let cut = body.slice(..body.len() - 12);
        assert_eq!(
            param(parse_upload(Endpoint::Transcriptions, &ct, cut).await.unwrap_err()),
            "file"
        );
    }
}
