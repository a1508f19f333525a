//! Transcription, speech and embeddings on the simulator's GPUs.
//!
//! Each request lives as a chat request does: the crash and refuse faults and the model are
//! checked at once, then its input (`InvalidInput` at once: no slot, no time, no request
//! number), then it takes a request number (its fault rolls), then a slot of its model's
//! GPU, queueing FIFO behind busy slots (counted in the queue depth; `Overloaded` when the
//! queue is full). Holding the slot it waits out its latency:
//!
//! - **transcription:** `transcribe_base_ms + transcribe_ms_per_audio_s × seconds of audio`;
//! - **embeddings:** `embed_base_ms + embed_us_per_token × input tokens`;
//! - **speech:** `speech_ttfa_ms` to the first chunk (the WAV header and the first
//!   `speech_chunk_ms` of audio), then a chunk every `speech_chunk_ms /
//!   speech_realtime_factor` (plus `slow_token_ms`) until the audio is complete.
//!
//! Faults: `error_rate` fails the request with `Injected` when its answer (its first chunk)
//! was due; `crash` fails it whenever it strikes, queued or in flight. A transcription or an
//! embedding is one piece: `stall_after_tokens = 0` never answers and `cut_after_tokens = 0`
//! fails with `Cut { after: 0 }`, larger values leave it alone. Speech counts chunks:
//! after `stall_after_tokens` chunks it goes silent, after `cut_after_tokens` chunks it ends
//! with `Cut`. `garbage_rate` draws a transcript's words, or embedding vectors, from another
//! key (same length and timing). The slot is given back when the answer (the last chunk) or
//! an error is produced, or the moment the request or stream is dropped.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use tokio::sync::{OwnedSemaphorePermit, watch};
use tokio::time::{Duration, Instant};

use super::{Arrival, FaultState, Rolls, Simulator, Slot, wait_or_crash};
use crate::audio::{
    AudioFormat, SPEECH_SAMPLE_RATE, Speech, Transcript, check_language, checked_duration,
    transcript, transcript_key,
};
use crate::config::Faults;
use crate::embed;
use crate::error::SimError;
use crate::text::splitmix64;

/// Salts a garbage answer's key apart from the true one.
const GARBAGE_KEY_SALT: u64 = 0x6761_7262_6167_654B;

fn garbled(key: u64, request_id: u64) -> u64 {
    splitmix64(key ^ GARBAGE_KEY_SALT ^ splitmix64(request_id))
}

/// A duration of `ms` milliseconds given as a float, rounded to the microsecond (so equal
/// inputs give equal, exact durations) and capped at an hour.
fn millis_f64(ms: f64) -> Duration {
    const HOUR_US: f64 = 3_600_000_000.0;
    let us = (ms * 1000.0).round();
    // NaN and negatives (never passed) become zero; `as` saturates, the cap bounds it.
    Duration::from_micros(if us > 0.0 { us.min(HOUR_US) as u64 } else { 0 })
}

/// Waits out a one-piece answer's latency under the faults: a stall never answers, an
/// injected error or a cut at 0 fails when the answer was due.
async fn one_piece(
    faults_rx: &mut watch::Receiver<FaultState>,
    epoch: u64,
    faults: &Faults,
    latency: Duration,
    injected: bool,
) -> Result<(), SimError> {
    let due = if faults.stall_after_tokens == Some(0) {
        None
    } else {
        Instant::now().checked_add(latency)
    };
    wait_or_crash(faults_rx, epoch, due).await?;
    if injected {
        return Err(SimError::Injected);
    }
    if faults.cut_after_tokens == Some(0) {
        return Err(SimError::Cut { after: 0 });
    }
    Ok(())
}

impl Simulator {
    /// Transcribes `audio` (a WAV file; other bytes are taken as 16 kHz 16-bit mono PCM-length
    /// for duration) for `model`.
    ///
    /// Fails at once with `Crashed`, `Refused` or `UnknownModel` as chat does, with
    /// `InvalidInput` (param `file`: empty audio, a malformed WAV, audio over `max_audio_s`;
    /// param `language`: not two or three letters) and `Overloaded`; later as the module
    /// docs say. The text is [`crate::expected_transcript`]'s. Cancel-safe.
    pub async fn transcribe(
        &self,
        model: &str,
        audio: &[u8],
        language: Option<&str>,
    ) -> Result<Transcript, SimError> {
        let Arrival { mut faults_rx, epoch, faults, model } = self.arrive(model)?;
        let language = check_language(language)?;
        let duration = checked_duration(audio, self.config.max_audio_s)?;
        let Rolls { request_id, injected, garbage } = self.roll(&faults);
        let permit =
            self.gpus[model.gpu].slot(self.config.max_queue)?.wait(&mut faults_rx, epoch).await?;
        let latency = Duration::from_millis(self.config.transcribe_base_ms)
            .saturating_add(millis_f64(self.config.transcribe_ms_per_audio_s as f64 * duration));
        one_piece(&mut faults_rx, epoch, &faults, latency, injected).await?;
        drop(permit);
        let mut key = transcript_key(self.config.seed, &model.config.id, audio);
        if garbage {
            key = garbled(key, request_id);
        }
        Ok(transcript(key, duration, language))
    }

    /// A transcription streamed as it is decoded: each word as soon as its share of the
    /// latency has passed (after `transcribe_base_ms`, each word after
    /// `transcribe_ms_per_audio_s` × its share of its segment's seconds: the whole takes what
    /// [`Simulator::transcribe`] takes), then the whole transcript. Fails at once as
    /// `transcribe` does; later, an injected error when the first word was due,
    /// `stall_after_tokens` / `cut_after_tokens` counting words, a crash whenever it strikes.
    /// Dropping the stream frees its slot.
    pub fn transcribe_stream(
        &self,
        model: &str,
        audio: &[u8],
        language: Option<&str>,
    ) -> Result<TranscriptStream, SimError> {
        let Arrival { faults_rx, epoch, faults, model } = self.arrive(model)?;
        let language = check_language(language)?;
        let duration = checked_duration(audio, self.config.max_audio_s)?;
        let Rolls { request_id, injected, garbage } = self.roll(&faults);
        let slot = self.gpus[model.gpu].slot(self.config.max_queue)?;
        let mut key = transcript_key(self.config.seed, &model.config.id, audio);
        if garbage {
            key = garbled(key, request_id);
        }
        let whole = transcript(key, duration, language);
        // Word by word, each taking its share of its segment's audio.
        let mut pieces = Vec::new();
        for seg in &whole.segments {
            let words: Vec<&str> = seg.text.split(' ').collect();
            let each = (seg.end - seg.start) / words.len().max(1) as f64;
            for w in words {
                let text = if pieces.is_empty() { w.to_owned() } else { format!(" {w}") };
                pieces.push((text, each));
            }
        }
        let run = TranscriptRun {
            pieces,
            faults_rx,
            epoch,
            slot: Some(slot),
            permit: None,
            base: Duration::from_millis(self.config.transcribe_base_ms),
            per_s: self.config.transcribe_ms_per_audio_s as f64,
            due: None,
            next: 0,
            whole: Some(whole),
            injected,
            stall_after: faults.stall_after_tokens,
            cut_after: faults.cut_after_tokens,
        };
        let inner = futures_util::stream::unfold(run, |mut run| async move {
            let item = run.next_event().await?;
            Some((item, run))
        });
        Ok(TranscriptStream { inner: Box::pin(inner) })
    }

    /// Speech for `input` as a byte stream: the first chunk (the WAV header plus the first
    /// audio) after the time to first audio, then chunks paced like a real-time-factor TTS;
    /// total length follows the text.
    ///
    /// Fails at once with `Crashed`, `Refused`, `UnknownModel`, `InvalidInput` (param
    /// `input`: empty or over 4096 characters; param `voice`: empty) or `Overloaded`. The
    /// stream takes its slot now if one is free, else waits for one when first polled; its
    /// first item is the first chunk or the error that ended the request before it (a crash
    /// while queued, an injected error, a cut at 0). Every byte is
    /// [`crate::expected_speech`]'s. Dropping the stream frees its slot or queue place.
    pub fn speech(
        &self,
        model: &str,
        input: &str,
        voice: &str,
        format: AudioFormat,
    ) -> Result<SpeechStream, SimError> {
        let Arrival { faults_rx, epoch, faults, model } = self.arrive(model)?;
        let speech = Speech::new(self.config.seed, &model.config.id, input, voice, format)?;
        let Rolls { request_id, injected, .. } = self.roll(&faults);
        let slot = self.gpus[model.gpu].slot(self.config.max_queue)?;
        let chunk_ms = self.config.speech_chunk_ms;
        let chunk_samples = u64::from(SPEECH_SAMPLE_RATE) * u64::from(chunk_ms) / 1000;
        let chunks = u32::try_from(speech.samples().div_ceil(chunk_samples)).unwrap_or(u32::MAX);
        let rtf = self.config.speech_realtime_factor;
        let gap = if rtf > 0.0 { millis_f64(f64::from(chunk_ms) / rtf) } else { Duration::ZERO };
        let content_length = speech.total_bytes();
        let samples = speech.samples();
        let run = SpeechRun {
            faults_rx,
            epoch,
            slot: Some(slot),
            permit: None,
            speech,
            ttfa: Duration::from_millis(self.config.speech_ttfa_ms),
            gap: gap.saturating_add(Duration::from_millis(faults.slow_token_ms)),
            first_at: None,
            next: 0,
            chunks,
            chunk_samples,
            injected,
            stall_after: faults.stall_after_tokens,
            cut_after: faults.cut_after_tokens,
            done: false,
        };
        let inner = futures_util::stream::unfold(run, |mut run| async move {
            let item = run.next_chunk().await?;
            Some((item, run))
        });
        Ok(SpeechStream {
            model: model.config.id.clone(),
            request_id,
            format,
            content_length,
            samples,
            chunks,
            inner: Box::pin(inner),
        })
    }

    /// Deterministic unit-length embeddings, one per input; `dimensions` default 384 (at most
    /// 4096).
    ///
    /// Fails at once with `Crashed`, `Refused`, `UnknownModel`, `InvalidInput` (param
    /// `input`: none, more than 2048, an empty one, one over 8192 tokens or all over 300000;
    /// param `dimensions`: 0 or over 4096) or `Overloaded`; later as the module docs say.
    /// Each vector is [`crate::expected_embedding`]'s. Cancel-safe.
    pub async fn embed(
        &self,
        model: &str,
        inputs: &[String],
        dimensions: Option<u32>,
    ) -> Result<Vec<Vec<f32>>, SimError> {
        let Arrival { mut faults_rx, epoch, faults, model } = self.arrive(model)?;
        let (dims, tokens) = embed::check(inputs, dimensions)?;
        let Rolls { request_id, injected, garbage } = self.roll(&faults);
        let permit =
            self.gpus[model.gpu].slot(self.config.max_queue)?.wait(&mut faults_rx, epoch).await?;
        let latency = Duration::from_millis(self.config.embed_base_ms).saturating_add(
            Duration::from_micros(self.config.embed_us_per_token).saturating_mul(tokens),
        );
        one_piece(&mut faults_rx, epoch, &faults, latency, injected).await?;
        drop(permit);
        Ok(inputs
            .iter()
            .map(|text| {
                let mut key = embed::embedding_key(self.config.seed, &model.config.id, text);
                if garbage {
                    key = garbled(key, request_id);
                }
                embed::vector(key, dims)
            })
            .collect())
    }
}

/// One speech request's remaining work. Owns its slot (or its queue place).
struct SpeechRun {
    faults_rx: watch::Receiver<FaultState>,
    epoch: u64,
    /// The claim on the GPU until it is turned into `permit`.
    slot: Option<Slot>,
    permit: Option<OwnedSemaphorePermit>,
    speech: Speech,
    ttfa: Duration,
    /// Between chunks.
    gap: Duration,
    /// When the first chunk is due, once admitted; `None` before (or beyond the clock).
    first_at: Option<Instant>,
    /// The next chunk's index.
    next: u32,
    chunks: u32,
    chunk_samples: u64,
    injected: bool,
    stall_after: Option<u32>,
    cut_after: Option<u32>,
    done: bool,
}

impl SpeechRun {
    /// Ends the run with `e`, releasing the slot.
    fn fail(&mut self, e: SimError) -> SimError {
        self.done = true;
        self.permit = None;
        self.slot = None;
        e
    }

    async fn next_chunk(&mut self) -> Option<Result<Bytes, SimError>> {
        if self.done {
            return None;
        }
        if let Some(slot) = self.slot.take() {
            match slot.wait(&mut self.faults_rx, self.epoch).await {
                Ok(p) => self.permit = Some(p),
                Err(e) => return Some(Err(self.fail(e))),
            }
            self.first_at = Instant::now().checked_add(self.ttfa);
            if self.injected {
                // The model runs until the first audio was due, then fails.
                let e = match wait_or_crash(&mut self.faults_rx, self.epoch, self.first_at).await {
                    Ok(()) => SimError::Injected,
                    Err(e) => e,
                };
                return Some(Err(self.fail(e)));
            }
        }
        let i = self.next;
        let due = if self.stall_after == Some(i) {
            // A stall: nothing more, ever. Only a crash (or dropping the stream) ends it.
            None
        } else {
            self.gap.checked_mul(i).and_then(|d| self.first_at?.checked_add(d))
        };
        if let Err(e) = wait_or_crash(&mut self.faults_rx, self.epoch, due).await {
            return Some(Err(self.fail(e)));
        }
        if self.cut_after == Some(i) {
            return Some(Err(self.fail(SimError::Cut { after: i })));
        }
        let from = u64::from(i) * self.chunk_samples;
        let to = from.saturating_add(self.chunk_samples).min(self.speech.samples());
        let header = if i == 0 { self.speech.header_len() } else { 0 };
        let mut out = BytesMut::with_capacity(header + 2 * (to - from) as usize);
        if i == 0 {
            self.speech.put_header(&mut out);
        }
        self.speech.put_samples(from, to, &mut out);
        self.next += 1;
        if self.next >= self.chunks {
            // The last chunk: the GPU is done with this request.
            self.done = true;
            self.permit = None;
        }
        Some(Ok(out.freeze()))
    }
}

/// One piece of a streamed transcription.
#[derive(Debug, Clone, PartialEq)]
pub enum TranscriptEvent {
    /// The next word (after the first, with a leading space).
    Delta(String),
    /// The whole transcript; always the last item of a successful stream.
    Done(Transcript),
}

/// One streamed transcription's remaining work. Owns its slot (or its queue place).
struct TranscriptRun {
    /// The words to send, each with its seconds of audio.
    pieces: Vec<(String, f64)>,
    faults_rx: watch::Receiver<FaultState>,
    epoch: u64,
    slot: Option<Slot>,
    permit: Option<OwnedSemaphorePermit>,
    base: Duration,
    per_s: f64,
    /// When the last segment was (or the decoding started, before the first).
    due: Option<Instant>,
    next: u32,
    /// Taken when the run ends.
    whole: Option<Transcript>,
    injected: bool,
    stall_after: Option<u32>,
    cut_after: Option<u32>,
}

impl TranscriptRun {
    fn fail(&mut self, e: SimError) -> SimError {
        self.whole = None;
        self.permit = None;
        self.slot = None;
        e
    }

    async fn next_event(&mut self) -> Option<Result<TranscriptEvent, SimError>> {
        self.whole.as_ref()?;
        if let Some(slot) = self.slot.take() {
            match slot.wait(&mut self.faults_rx, self.epoch).await {
                Ok(p) => self.permit = Some(p),
                Err(e) => return Some(Err(self.fail(e))),
            }
            self.due = Instant::now().checked_add(self.base);
        }
        let i = self.next;
        let Some((text, seconds)) = self.pieces.get(i as usize).cloned() else {
            self.permit = None;
            return self.whole.take().map(|t| Ok(TranscriptEvent::Done(t)));
        };
        let took = millis_f64(self.per_s * seconds);
        let due = if self.stall_after == Some(i) {
            None
        } else {
            self.due.and_then(|d| d.checked_add(took))
        };
        if let Err(e) = wait_or_crash(&mut self.faults_rx, self.epoch, due).await {
            return Some(Err(self.fail(e)));
        }
        if self.injected && i == 0 {
            return Some(Err(self.fail(SimError::Injected)));
        }
        if self.cut_after == Some(i) {
            return Some(Err(self.fail(SimError::Cut { after: i })));
        }
        self.due = due;
        self.next += 1;
        Some(Ok(TranscriptEvent::Delta(text)))
    }
}

/// A transcription's words as they are decoded, then the whole ([`TranscriptEvent`]).
/// Ends after `Done`, after an `Err`, or never (a stall). Dropping it frees its slot.
pub struct TranscriptStream {
    inner: Pin<Box<dyn Stream<Item = Result<TranscriptEvent, SimError>> + Send>>,
}

impl std::fmt::Debug for TranscriptStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TranscriptStream").finish_non_exhaustive()
    }
}

impl Stream for TranscriptStream {
    type Item = Result<TranscriptEvent, SimError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

/// A streamed transcription as OpenAI's server-sent events: `transcript.text.delta` per
/// word, then `transcript.text.done` with the text and its usage (seconds of audio). A
/// failure ends the stream with the `Err`.
pub fn transcript_sse(
    stream: TranscriptStream,
) -> impl Stream<Item = Result<Bytes, SimError>> + Send + 'static {
    use futures_util::StreamExt as _;
    stream.map(|item| {
        item.map(|ev| {
            let v = match ev {
                TranscriptEvent::Delta(delta) => {
                    serde_json::json!({"type": "transcript.text.delta", "delta": delta})
                }
                TranscriptEvent::Done(t) => serde_json::json!({"type": "transcript.text.done",
                    "text": t.text,
                    "usage": {"type": "duration", "seconds": t.duration_s.ceil() as u64}}),
            };
            Bytes::from(format!("data: {v}\n\n"))
        })
    })
}

/// A speech request's audio: a stream of byte chunks that concatenate to the whole body
/// (`content_length` bytes: for WAV, the header with the real sizes, then the samples).
/// Ends after the last chunk, after an `Err` (injected, cut or crash), or never (a stall).
/// Dropping it frees its GPU slot or queue place immediately.
pub struct SpeechStream {
    model: String,
    request_id: u64,
    format: AudioFormat,
    content_length: u64,
    samples: u64,
    chunks: u32,
    inner: Pin<Box<dyn Stream<Item = Result<Bytes, SimError>> + Send>>,
}

impl std::fmt::Debug for SpeechStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpeechStream")
            .field("model", &self.model)
            .field("request_id", &self.request_id)
            .field("format", &self.format)
            .field("content_length", &self.content_length)
            .finish_non_exhaustive()
    }
}

impl SpeechStream {
    pub fn model(&self) -> &str {
        &self.model
    }

    /// The simulator's sequence number for this request (also the one its fault roll used).
    pub fn request_id(&self) -> u64 {
        self.request_id
    }

    pub fn format(&self) -> AudioFormat {
        self.format
    }

    /// The whole body's length in bytes, header included, when nothing goes wrong.
    pub fn content_length(&self) -> u64 {
        self.content_length
    }

    /// The audio's duration in seconds.
    pub fn duration_s(&self) -> f64 {
        self.samples as f64 / f64::from(SPEECH_SAMPLE_RATE)
    }

    /// Chunks in the whole body (not to be confused with `StreamExt::chunks`).
    pub fn chunk_count(&self) -> u32 {
        self.chunks
    }
}

impl Stream for SpeechStream {
    type Item = Result<Bytes, SimError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

#[cfg(test)]
mod tests;
