//! What the simulator hears and says: WAV parsing, transcripts and speech samples, all pure.
//!
//! Like `text`, nothing here knows about time, slots or faults; the engine decides *when*.
//! The rules, all deterministic:
//! - **Audio duration.** Bytes starting with `RIFF` are a WAV file: its `fmt ` and `data`
//!   chunks give the duration (a malformed one is refused). Other bytes are taken as 16 kHz
//!   16-bit mono PCM: `len / 32000` seconds. Empty bytes are refused.
//! - **Transcripts.** A key hashed from the seed, the model and every byte of the audio
//!   draws words from the answers' vocabulary: `round(2.5 × seconds)` of them (at least one
//!   for audio longer than zero), split evenly over `ceil(seconds / 5)` segments of equal
//!   length, each a sentence (capitalised, ending in a full stop). The text is the segments
//!   joined by spaces. [`expected_transcript`] predicts it.
//! - **Speech.** Each character of the input is 1/15 s of audio ([`SAMPLES_PER_CHAR`]
//!   samples at [`SPEECH_SAMPLE_RATE`]): a quiet tone whose pitch (100–299 Hz) depends on
//!   the seed, model and voice, its loudness on the character (silence for whitespace), with
//!   5 ms ramps so characters do not click. Samples use only integer and IEEE arithmetic, so
//!   they are the same bytes on every platform. WAV output is a 44-byte header with the real
//!   sizes, then the samples (16-bit little-endian mono); PCM output is the samples alone.
//!   [`expected_speech`] predicts every byte.

use bytes::{BufMut, BytesMut};
use serde::{Deserialize, Serialize};

use crate::config::SimConfig;
use crate::error::SimError;
use crate::text::{mix_bytes, splitmix64, word};

/// Output audio container of speech.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AudioFormat {
    /// A RIFF/WAVE file: a 44-byte header with the real sizes, then the PCM samples.
    Wav,
    /// Raw 16-bit little-endian mono samples at [`SPEECH_SAMPLE_RATE`].
    Pcm,
}

impl AudioFormat {
    /// The content type of a body in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            AudioFormat::Wav => "audio/wav",
            AudioFormat::Pcm => "audio/pcm",
        }
    }
}

/// The sample rate of speech: OpenAI's `pcm` rate.
pub const SPEECH_SAMPLE_RATE: u32 = 24_000;

/// Characters of text per second of speech.
pub const SPEECH_CHARS_PER_S: u32 = 15;

/// Samples of speech per character of text: 1600 (1/15 s at 24 kHz).
pub const SAMPLES_PER_CHAR: u64 = (SPEECH_SAMPLE_RATE / SPEECH_CHARS_PER_S) as u64;

/// The longest speech input, in characters (OpenAI's limit).
pub const MAX_SPEECH_INPUT_CHARS: usize = 4096;

/// The size of the WAV header speech writes.
pub const WAV_HEADER_LEN: usize = 44;

/// Bytes per second of non-WAV audio: 16 kHz, 16-bit, mono.
const RAW_BYTES_PER_S: f64 = 32_000.0;

/// What a transcription heard.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Transcript {
    /// The segments' texts joined by single spaces.
    pub text: String,
    /// The language asked for, lowercased, else `en`.
    pub language: String,
    /// The audio's duration in seconds.
    pub duration_s: f64,
    pub segments: Vec<Segment>,
}

/// A stretch of at most five seconds of a transcript.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Segment {
    /// 0, 1, 2… in order.
    pub id: u32,
    /// Seconds from the start of the audio.
    pub start: f64,
    pub end: f64,
    pub text: String,
}

/// What a WAV file's header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WavInfo {
    /// The `fmt ` chunk's format tag: 1 PCM, 3 IEEE float, 0xFFFE extensible…
    pub format_tag: u16,
    pub channels: u16,
    pub sample_rate: u32,
    pub bits_per_sample: u16,
    /// Bytes per frame (one sample of every channel).
    pub block_align: u16,
    /// Where the `data` chunk's bytes start in the file.
    pub data_offset: usize,
    /// The `data` chunk's length, as present in the file: a size field beyond the end of the
    /// file (a streamed WAV writes `0xFFFFFFFF` or `0`) counts only the bytes there.
    pub data_len: usize,
    /// The `RIFF` size field: the file's length minus 8 for a well-formed file.
    pub riff_size: u32,
    /// The `data` chunk's own size field, as written.
    pub data_size_field: u32,
}

impl WavInfo {
    /// The audio's duration in seconds: whole frames over the sample rate.
    pub fn duration_s(&self) -> f64 {
        (self.data_len / usize::from(self.block_align)) as f64 / f64::from(self.sample_rate)
    }
}

fn bad_audio(message: impl Into<String>) -> SimError {
    SimError::invalid("file", "invalid_audio", message)
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Parses a WAV file's `RIFF` header and its `fmt ` and `data` chunks. Refuses (with
/// `InvalidInput`, param `file`, code `invalid_audio`) anything that is not a RIFF/WAVE
/// file, a missing or short `fmt ` chunk, zero channels, rate or frame size, a `data`
/// chunk before `fmt `, or no `data` chunk at all.
pub fn parse_wav(bytes: &[u8]) -> Result<WavInfo, SimError> {
    if bytes.len() < 12 || &bytes[..4] != b"RIFF" {
        return Err(bad_audio("Invalid WAV file: it does not start with a RIFF header."));
    }
    if &bytes[8..12] != b"WAVE" {
        return Err(bad_audio("Invalid WAV file: the RIFF file is not of form WAVE."));
    }
    let riff_size = le32(bytes, 4);
    let mut fmt: Option<(u16, u16, u32, u16, u16)> = None;
    let mut at = 12usize;
    while bytes.len().saturating_sub(at) >= 8 {
        let id = &bytes[at..at + 4];
        let size = le32(bytes, at + 4);
        let body = at + 8;
        let available = bytes.len() - body;
        if id == b"data" {
            let Some((format_tag, channels, sample_rate, bits_per_sample, block_align)) = fmt
            else {
                return Err(bad_audio("Invalid WAV file: the data chunk comes before fmt."));
            };
            return Ok(WavInfo {
                format_tag,
                channels,
                sample_rate,
                bits_per_sample,
                block_align,
                data_offset: body,
                data_len: usize::try_from(size).unwrap_or(usize::MAX).min(available),
                riff_size,
                data_size_field: size,
            });
        }
        let size = usize::try_from(size).unwrap_or(usize::MAX);
        if id == b"fmt " {
            if size < 16 || available < 16 {
                return Err(bad_audio("Invalid WAV file: the fmt chunk is too short."));
            }
            let format_tag = le16(bytes, body);
            let channels = le16(bytes, body + 2);
            let sample_rate = le32(bytes, body + 4);
            let block_align = le16(bytes, body + 12);
            let bits = le16(bytes, body + 14);
            if channels == 0 || sample_rate == 0 || block_align == 0 || bits == 0 {
                return Err(bad_audio(format!(
                    "Invalid WAV file: {channels} channels, {sample_rate} Hz, {bits} bits, \
                     {block_align} bytes per frame."
                )));
            }
            fmt = Some((format_tag, channels, sample_rate, bits, block_align));
        }
        // Chunks are padded to an even length.
        at = body.saturating_add(size).saturating_add(size & 1);
    }
    Err(bad_audio(if fmt.is_none() {
        "Invalid WAV file: no fmt chunk."
    } else {
        "Invalid WAV file: no data chunk."
    }))
}

/// The duration of `audio` in seconds: from its header if it is a WAV file, else as 16 kHz
/// 16-bit mono PCM. Refuses empty bytes and malformed WAV files.
pub fn audio_duration_s(audio: &[u8]) -> Result<f64, SimError> {
    if audio.is_empty() {
        return Err(bad_audio("The audio file is empty."));
    }
    if audio.starts_with(b"RIFF") {
        return Ok(parse_wav(audio)?.duration_s());
    }
    Ok(audio.len() as f64 / RAW_BYTES_PER_S)
}

/// A language hint as given (`en`, `de`, `yue`), lowercased; refuses anything but two or
/// three ASCII letters. `None` means `en`.
pub(crate) fn check_language(language: Option<&str>) -> Result<String, SimError> {
    match language {
        None => Ok("en".to_owned()),
        Some(l) if (2..=3).contains(&l.len()) && l.bytes().all(|b| b.is_ascii_alphabetic()) => {
            Ok(l.to_ascii_lowercase())
        }
        Some(l) => Err(SimError::invalid(
            "language",
            "invalid_language",
            format!("Invalid language `{}`: use an ISO-639-1 code such as `en`.", l.escape_debug()),
        )),
    }
}

/// Checks that `audio` lasts at most `max_s` seconds; returns its duration.
pub(crate) fn checked_duration(audio: &[u8], max_s: u32) -> Result<f64, SimError> {
    let duration = audio_duration_s(audio)?;
    if duration > f64::from(max_s) {
        return Err(SimError::invalid(
            "file",
            "audio_too_long",
            format!(
                "The audio lasts {duration:.1} s; the longest this server transcribes is \
                 {max_s} s."
            ),
        ));
    }
    Ok(duration)
}

const TRANSCRIPT_SALT: u64 = 0x7472_616E_7363_7269;
const SPEECH_SALT: u64 = 0x7370_6565_6368_2121;

/// The key a transcript's words are drawn from.
pub(crate) fn transcript_key(seed: u64, model: &str, audio: &[u8]) -> u64 {
    mix_bytes(mix_bytes(seed ^ TRANSCRIPT_SALT, model.as_bytes()), audio)
}

/// Seconds of audio per segment at most.
const SEGMENT_S: f64 = 5.0;
/// Words per second of audio.
const WORDS_PER_S: f64 = 2.5;

/// The transcript of `duration_s` seconds of audio whose words are drawn from `key`.
pub(crate) fn transcript(key: u64, duration_s: f64, language: String) -> Transcript {
    let words =
        if duration_s > 0.0 { ((duration_s * WORDS_PER_S).round() as u32).max(1) } else { 0 };
    let spans = if words == 0 { 0 } else { (duration_s / SEGMENT_S).ceil().max(1.0) as u32 };
    let mut segments = Vec::with_capacity(spans as usize);
    for s in 0..spans {
        // Words split evenly: segment s holds [s·n/S, (s+1)·n/S).
        let (from, to) = (
            (u64::from(s) * u64::from(words) / u64::from(spans)) as u32,
            (u64::from(s + 1) * u64::from(words) / u64::from(spans)) as u32,
        );
        if from == to {
            continue;
        }
        let mut text = String::new();
        for i in from..to {
            let w = word(key, i);
            if i == from {
                let mut chars = w.chars();
                if let Some(c) = chars.next() {
                    text.extend(c.to_uppercase());
                    text.push_str(chars.as_str());
                }
            } else {
                text.push(' ');
                text.push_str(w);
            }
        }
        text.push('.');
        let start = duration_s * f64::from(s) / f64::from(spans);
        let end = if s + 1 == spans {
            duration_s
        } else {
            duration_s * f64::from(s + 1) / f64::from(spans)
        };
        segments.push(Segment { id: segments.len() as u32, start, end, text });
    }
    let text = segments.iter().map(|s| s.text.as_str()).collect::<Vec<_>>().join(" ");
    Transcript { text, language, duration_s, segments }
}

/// Exactly what a fault-free transcription of `audio` by `model` returns, or the error it
/// fails with before queueing.
pub fn expected_transcript(
    cfg: &SimConfig,
    model: &str,
    audio: &[u8],
    language: Option<&str>,
) -> Result<Transcript, SimError> {
    let language = check_language(language)?;
    let duration = checked_duration(audio, cfg.max_audio_s)?;
    Ok(transcript(transcript_key(cfg.seed, model, audio), duration, language))
}

/// One speech request's samples: a loudness per character and a pitch.
#[derive(Debug, Clone)]
pub(crate) struct Speech {
    /// Peak amplitude of each character's stretch of audio; 0 for whitespace.
    amps: Vec<u16>,
    freq_hz: u64,
    pub(crate) format: AudioFormat,
}

/// Ramp length at each end of a character, in samples: 5 ms.
const RAMP: u64 = 120;

/// `sin(π t)` for `t` in [0, 1], by Bhaskara I's approximation (within 0.2 %): IEEE
/// arithmetic only, so the same on every platform, unlike `f64::sin`.
fn half_sine(t: f64) -> f64 {
    let p = t * (1.0 - t);
    16.0 * p / (5.0 - 4.0 * p)
}

impl Speech {
    /// Checks `input` and `voice` and plans the audio. Refuses (param `input` or `voice`)
    /// an empty input, one over [`MAX_SPEECH_INPUT_CHARS`] characters, and an empty voice.
    pub(crate) fn new(
        seed: u64,
        model: &str,
        input: &str,
        voice: &str,
        format: AudioFormat,
    ) -> Result<Self, SimError> {
        if input.is_empty() {
            return Err(SimError::invalid("input", "empty_input", "The input text is empty."));
        }
        let chars = input.chars().count();
        if chars > MAX_SPEECH_INPUT_CHARS {
            return Err(SimError::invalid(
                "input",
                "input_too_long",
                format!(
                    "The input is {chars} characters long; the longest allowed is \
                     {MAX_SPEECH_INPUT_CHARS}."
                ),
            ));
        }
        if voice.is_empty() {
            return Err(SimError::invalid("voice", "invalid_voice", "The voice is empty."));
        }
        let key = mix_bytes(mix_bytes(seed ^ SPEECH_SALT, model.as_bytes()), voice.as_bytes());
        let amps = input
            .chars()
            .map(|c| {
                if c.is_whitespace() {
                    0
                } else {
                    // 800..3200 of 32767: between about -32 and -20 dBFS, quiet.
                    800 + (splitmix64(key ^ u64::from(u32::from(c))) % 2400) as u16
                }
            })
            .collect();
        Ok(Speech { amps, freq_hz: 100 + key % 200, format })
    }

    /// Samples in the whole audio.
    pub(crate) fn samples(&self) -> u64 {
        self.amps.len() as u64 * SAMPLES_PER_CHAR
    }

    /// The header length for this format: 44 for WAV, 0 for PCM.
    pub(crate) fn header_len(&self) -> usize {
        match self.format {
            AudioFormat::Wav => WAV_HEADER_LEN,
            AudioFormat::Pcm => 0,
        }
    }

    /// Bytes in the whole body, header included.
    pub(crate) fn total_bytes(&self) -> u64 {
        self.header_len() as u64 + 2 * self.samples()
    }

    /// The WAV header for this audio; nothing for PCM.
    pub(crate) fn put_header(&self, out: &mut BytesMut) {
        if self.format == AudioFormat::Pcm {
            return;
        }
        // At most 4096 × 1600 × 2 bytes: far inside u32.
        let data = u32::try_from(2 * self.samples()).unwrap_or(u32::MAX);
        put_wav_header(out, SPEECH_SAMPLE_RATE, data);
    }

    /// Appends samples `[from, to)` as 16-bit little-endian.
    pub(crate) fn put_samples(&self, from: u64, to: u64, out: &mut BytesMut) {
        let rate = u64::from(SPEECH_SAMPLE_RATE);
        for n in from..to.min(self.samples()) {
            let amp = self.amps[(n / SAMPLES_PER_CHAR) as usize];
            if amp == 0 {
                out.put_i16_le(0);
                continue;
            }
            let k = n % SAMPLES_PER_CHAR;
            let ramp = k.min(SAMPLES_PER_CHAR - 1 - k).min(RAMP) as f64 / RAMP as f64;
            // The phase, exactly: (n·f mod rate) / rate of a period; the first half positive.
            let phase = (n * self.freq_hz) % rate;
            let (t, sign) = if phase * 2 < rate { (phase, 1.0) } else { (phase - rate / 2, -1.0) };
            let s = sign * half_sine(t as f64 / (rate / 2) as f64);
            out.put_i16_le((f64::from(amp) * ramp * s).round() as i16);
        }
    }
}

/// Every byte of a fault-free speech body for `input` in `voice`, or the error the request
/// fails with before queueing.
pub fn expected_speech(
    cfg: &SimConfig,
    model: &str,
    input: &str,
    voice: &str,
    format: AudioFormat,
) -> Result<Vec<u8>, SimError> {
    let speech = Speech::new(cfg.seed, model, input, voice, format)?;
    let mut out = BytesMut::with_capacity(speech.total_bytes() as usize);
    speech.put_header(&mut out);
    speech.put_samples(0, speech.samples(), &mut out);
    Ok(out.to_vec())
}

/// A WAV file of `samples` (16-bit mono at `rate`): for tests and demos that need audio to
/// transcribe.
pub fn wav_file(rate: u32, samples: &[i16]) -> Vec<u8> {
    let data = u32::try_from(samples.len() * 2).unwrap_or(u32::MAX);
    let mut out = BytesMut::with_capacity(WAV_HEADER_LEN + samples.len() * 2);
    put_wav_header(&mut out, rate, data);
    for s in samples {
        out.put_i16_le(*s);
    }
    out.to_vec()
}

/// The 44-byte header of a 16-bit mono PCM WAV file with `data` bytes of samples.
fn put_wav_header(out: &mut BytesMut, rate: u32, data: u32) {
    out.put_slice(b"RIFF");
    out.put_u32_le(data.saturating_add(36));
    out.put_slice(b"WAVEfmt ");
    out.put_u32_le(16);
    out.put_u16_le(1); // PCM
    out.put_u16_le(1); // mono
    out.put_u32_le(rate);
    out.put_u32_le(rate.saturating_mul(2)); // bytes per second
    out.put_u16_le(2); // bytes per frame
    out.put_u16_le(16); // bits per sample
    out.put_slice(b"data");
    out.put_u32_le(data);
}

#[cfg(test)]
mod tests;
