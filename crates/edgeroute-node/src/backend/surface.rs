//! The OpenAI endpoints beside chat that a voice agent uses — speech-to-text
//! (`/v1/audio/transcriptions`, `/v1/audio/translations`), text-to-speech (`/v1/audio/speech`)
//! and `/v1/embeddings` — on each backend:
//!
//! - an OpenAI-compatible upstream (vLLM's Whisper, a TTS server, llama.cpp's embeddings)
//!   receives the client's bytes untouched on the same path, and its answer is streamed back
//!   as it comes (audio first, for speech);
//! - the simulator answers in process: a deterministic transcript, a WAV/PCM stream, unit
//!   vectors, at realistic speeds.
//!
//! The gateway (`crate::gateway::surface`) has already authenticated, admitted and parsed the
//! request; here it only meets the backend.

use std::pin::Pin;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http::HeaderValue;

pub use edgeroute_proto::audio::TranscriptFormat;

use super::BackendError;

/// One of the endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Transcriptions,
    Translations,
    Speech,
    Embeddings,
    /// OpenAI's text completions (`/v1/completions`).
    Completions,
}

impl Endpoint {
    /// The path, on the node and on an upstream.
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Transcriptions => "/v1/audio/transcriptions",
            Endpoint::Translations => "/v1/audio/translations",
            Endpoint::Speech => "/v1/audio/speech",
            Endpoint::Embeddings => "/v1/embeddings",
            Endpoint::Completions => "/v1/completions",
        }
    }

    /// The metrics' `route` label.
    pub fn label(self) -> &'static str {
        match self {
            Endpoint::Transcriptions => "transcriptions",
            Endpoint::Translations => "translations",
            Endpoint::Speech => "speech",
            Endpoint::Embeddings => "embeddings",
            Endpoint::Completions => "completions",
        }
    }

    /// Whether the request is a multipart upload (else JSON).
    pub fn is_upload(self) -> bool {
        matches!(self, Endpoint::Transcriptions | Endpoint::Translations)
    }
}

/// A request the gateway has parsed and checked.
#[derive(Debug, Clone, PartialEq)]
pub enum Parsed {
    /// Speech to text; `translate`: into English (`/v1/audio/translations`).
    Transcribe {
        model: String,
        audio: Bytes,
        language: Option<String>,
        format: TranscriptFormat,
        translate: bool,
        /// OpenAI's `stream`: the transcript's words as server-sent events as they come.
        stream: bool,
    },
    /// Text to speech; `format`: `response_format` as asked (OpenAI's default is mp3; a
    /// backend that cannot encode it says so, the simulator answers WAV).
    Speech { model: String, input: String, voice: String, format: Option<String> },
    /// Embeddings of each input.
    Embed { model: String, inputs: Vec<String>, dimensions: Option<u32>, base64: bool },
    /// A text completion of one prompt (`stream`: SSE, with the usage chunk when asked).
    Complete { model: String, prompt: String, max_tokens: u32, stream: bool, include_usage: bool },
}

impl Parsed {
    pub fn model(&self) -> &str {
        match self {
            Parsed::Transcribe { model, .. }
            | Parsed::Speech { model, .. }
            | Parsed::Embed { model, .. }
            | Parsed::Complete { model, .. } => model,
        }
    }
}

/// The call: what was parsed, and the client's bytes for an upstream.
#[derive(Debug, Clone)]
pub struct SurfaceCall {
    pub endpoint: Endpoint,
    pub parsed: Parsed,
    /// The body as the client sent it.
    pub raw: Bytes,
    /// Its `Content-Type` (a multipart upload's carries the boundary).
    pub content_type: HeaderValue,
}

/// Body chunks as the backend produces them.
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, BackendError>> + Send>>;

/// The answer, from its first byte on (the commit point: before it, a failure is a clean
/// error; after it, a cut stream).
pub struct SurfaceReply {
    pub content_type: HeaderValue,
    pub first: Bytes,
    pub rest: ByteStream,
}

impl std::fmt::Debug for SurfaceReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SurfaceReply")
            .field("content_type", &self.content_type)
            .field("first", &self.first.len())
            .finish_non_exhaustive()
    }
}

impl SurfaceReply {
    /// A whole answer in one piece.
    pub fn whole(content_type: &'static str, body: Bytes) -> SurfaceReply {
        SurfaceReply {
            content_type: HeaderValue::from_static(content_type),
            first: body,
            rest: Box::pin(futures_util::stream::empty()),
        }
    }

    /// Waits (at most `deadline`) for the first non-empty chunk of `stream`.
    pub async fn first_of(
        content_type: HeaderValue,
        mut stream: ByteStream,
        deadline: std::time::Duration,
    ) -> Result<SurfaceReply, BackendError> {
        loop {
            match tokio::time::timeout(deadline, stream.next()).await {
                Err(_) => {
                    return Err(BackendError::Timeout(format!(
                        "the backend sent no byte within {} ms",
                        deadline.as_millis()
                    )));
                }
                Ok(None) => {
                    return Ok(SurfaceReply { content_type, first: Bytes::new(), rest: stream });
                }
                Ok(Some(Err(e))) => return Err(e),
                Ok(Some(Ok(b))) if b.is_empty() => continue,
                Ok(Some(Ok(first))) => {
                    return Ok(SurfaceReply { content_type, first, rest: stream });
                }
            }
        }
    }
}

/// Base64 of little-endian f32s, as OpenAI's `encoding_format: "base64"`.
pub fn base64_f32(v: &[f32]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_is_the_standard_alphabet_with_padding() {
        // 1.0f32 = 00 00 80 3f
        assert_eq!(base64_f32(&[1.0]), "AACAPw==");
        assert_eq!(base64_f32(&[]), "");
        assert_eq!(base64_f32(&[0.0, 0.0, 0.0]).len(), 16);
    }

    #[test]
    fn formats_and_paths() {
        assert_eq!(TranscriptFormat::parse("verbose_json"), Some(TranscriptFormat::VerboseJson));
        assert_eq!(TranscriptFormat::parse("mp3"), None);
        assert!(Endpoint::Translations.is_upload() && !Endpoint::Speech.is_upload());
        assert_eq!(Endpoint::Embeddings.path(), "/v1/embeddings");
    }
}
