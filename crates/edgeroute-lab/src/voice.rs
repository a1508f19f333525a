//! What the lab sends to a node's voice surface (issue 19), built by hand as any client would:
//! deterministic audio clips, the multipart upload `/v1/audio/transcriptions` takes, the JSON
//! of `/v1/audio/speech`, `/v1/embeddings` and `/v1/completions`; and the few figures the lab
//! reads back from a node's `/metrics` (answers and time to first byte, by route).

use bytes::Bytes;

pub const TRANSCRIPTIONS_PATH: &str = "/v1/audio/transcriptions";
pub const SPEECH_PATH: &str = "/v1/audio/speech";
pub const EMBEDDINGS_PATH: &str = "/v1/embeddings";
pub const COMPLETIONS_PATH: &str = "/v1/completions";

/// The sample rate of the clips the lab uploads (Whisper's).
pub const CLIP_RATE: u32 = 16_000;

/// A WAV clip (16-bit mono at `rate` Hz) of `seconds`: a quiet tone whose pitch follows
/// `seed`, in syllable-like bursts of 200 ms. The same arguments give the same bytes, so a
/// simulator's transcript of it is the same on every run.
pub fn clip(seed: u64, seconds: f64, rate: u32) -> Vec<u8> {
    let n = (seconds.max(0.0) * f64::from(rate)).round() as usize;
    let freq = 120.0 + (seed % 97) as f64 * 2.0;
    let syllable = (f64::from(rate) * 0.2).max(1.0) as usize;
    let samples: Vec<i16> = (0..n)
        .map(|i| {
            let t = i as f64 / f64::from(rate);
            // A raised-cosine envelope per syllable; every fourth one a pause.
            let k = i / syllable;
            if (k as u64 + seed) % 4 == 3 {
                return 0;
            }
            let phase = (i % syllable) as f64 / syllable as f64;
            let env = 0.5 - 0.5 * (2.0 * std::f64::consts::PI * phase).cos();
            (3000.0 * env * (2.0 * std::f64::consts::PI * freq * t).sin()).round() as i16
        })
        .collect();
    edgeroute_sim::audio::wav_file(rate, &samples)
}

/// A `multipart/form-data` upload for `/v1/audio/transcriptions` (or `/translations`): the
/// `model` field, then the `file` part named `filename` as `audio/wav`. Returns the
/// `Content-Type` (with its boundary) and the body. The boundary is chosen not to occur in the
/// audio; quotes and line breaks in `filename` are replaced.
pub fn transcription_form(model: &str, filename: &str, audio: &[u8]) -> (String, Bytes) {
    let filename: String = filename
        .chars()
        .map(|c| if c == '"' || c == '\\' || c.is_control() { '_' } else { c })
        .collect();
    let mut salt = audio.len() as u64;
    let boundary = loop {
        let b = format!("edgeroute-lab-{salt:016x}");
        let marker = format!("--{b}");
        let occurs = |hay: &[u8]| hay.windows(marker.len()).any(|w| w == marker.as_bytes());
        if !occurs(audio) && !occurs(model.as_bytes()) {
            break b;
        }
        salt = salt.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    };
    let mut body = Vec::with_capacity(audio.len() + 256);
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{model}\r\n\
             --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n\
             Content-Type: audio/wav\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(audio);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), Bytes::from(body))
}

/// `/v1/audio/speech`'s JSON: `input` in `voice`, as WAV (what the simulator speaks).
pub fn speech_body(model: &str, input: &str, voice: &str) -> Bytes {
    let v = serde_json::json!({
        "model": model,
        "input": input,
        "voice": voice,
        "response_format": "wav",
    });
    Bytes::from(v.to_string())
}

/// `/v1/embeddings`' JSON: one input.
pub fn embeddings_body(model: &str, input: &str) -> Bytes {
    Bytes::from(serde_json::json!({ "model": model, "input": input }).to_string())
}

/// `/v1/completions`' JSON (not streamed).
pub fn completions_body(model: &str, prompt: &str, max_tokens: u32) -> Bytes {
    let v = serde_json::json!({ "model": model, "prompt": prompt, "max_tokens": max_tokens });
    Bytes::from(v.to_string())
}

/// The `text` of a transcription's JSON answer.
pub fn transcript_text(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v.get("text")?.as_str().map(str::to_owned)
}

/// Whether `body` is a WAV file with audio after its header.
pub fn is_wav(body: &[u8]) -> bool {
    body.len() > 44 && body.starts_with(b"RIFF") && &body[8..12] == b"WAVE"
}

/// The value of the sample of `metric` (its full name, e.g.
/// `edgeroute_node_first_byte_seconds_count`) whose labels include every `labels` pair, in a
/// Prometheus / OpenMetrics text exposition; the sum over every matching sample (several
/// statuses, say), `0` when none matches.
pub fn metric_value(exposition: &str, metric: &str, labels: &[(&str, &str)]) -> f64 {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let (name_labels, value) = line.rsplit_once(' ')?;
            let (name, rest) = match name_labels.split_once('{') {
                Some((n, r)) => (n, r.strip_suffix('}')?),
                None => (name_labels, ""),
            };
            if name != metric {
                return None;
            }
            let pairs: Vec<(&str, &str)> = rest
                .split(',')
                .filter_map(|p| {
                    let (k, v) = p.split_once('=')?;
                    Some((k.trim(), v.trim().trim_matches('"')))
                })
                .collect();
            if !labels.iter().all(|want| pairs.contains(want)) {
                return None;
            }
            value.trim().parse::<f64>().ok()
        })
        .sum()
}

/// What a node's `/metrics` says about one route of the voice surface: answers by status
/// class, and the count and sum of its time to first byte.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RouteFigures {
    /// `edgeroute_node_requests_total{route, status="200"}`.
    pub ok: f64,
    /// `edgeroute_node_first_byte_seconds_count{route}`.
    pub first_bytes: f64,
    /// `edgeroute_node_first_byte_seconds_sum{route}`, seconds.
    pub first_byte_s: f64,
}

impl RouteFigures {
    /// The figures of `route` (`transcriptions`, `speech`…) in a node's exposition.
    pub fn of(exposition: &str, route: &str) -> RouteFigures {
        RouteFigures {
            ok: metric_value(
                exposition,
                "edgeroute_node_requests_total",
                &[("route", route), ("status", "200")],
            ),
            first_bytes: metric_value(
                exposition,
                "edgeroute_node_first_byte_seconds_count",
                &[("route", route)],
            ),
            first_byte_s: metric_value(
                exposition,
                "edgeroute_node_first_byte_seconds_sum",
                &[("route", route)],
            ),
        }
    }

    /// These figures minus `earlier`'s (counters only grow).
    pub fn since(self, earlier: RouteFigures) -> RouteFigures {
        RouteFigures {
            ok: self.ok - earlier.ok,
            first_bytes: self.first_bytes - earlier.first_bytes,
            first_byte_s: self.first_byte_s - earlier.first_byte_s,
        }
    }

    /// Adds another node's figures.
    pub fn plus(self, other: RouteFigures) -> RouteFigures {
        RouteFigures {
            ok: self.ok + other.ok,
            first_bytes: self.first_bytes + other.first_bytes,
            first_byte_s: self.first_byte_s + other.first_byte_s,
        }
    }

    /// Mean time to first byte, milliseconds; `None` without a sample.
    pub fn mean_first_byte_ms(self) -> Option<f64> {
        (self.first_bytes > 0.0).then(|| self.first_byte_s / self.first_bytes * 1000.0)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

    use super::*;
    use edgeroute_node::backend::surface::{Endpoint, Parsed};

    #[test]
    fn a_clip_is_a_wav_file_of_its_length_and_the_same_every_time() {
        let a = clip(3, 2.5, CLIP_RATE);
        assert_eq!(a, clip(3, 2.5, CLIP_RATE));
        assert_ne!(a, clip(4, 2.5, CLIP_RATE));
        let info = edgeroute_sim::audio::parse_wav(&a).unwrap();
        assert_eq!((info.sample_rate, info.channels), (CLIP_RATE, 1));
        assert!((info.duration_s() - 2.5).abs() < 1e-9);
        assert!(is_wav(&a));
        assert!(!is_wav(b"RIFF"));
        // The simulator hears words in it: 2.5 per second.
        let t = edgeroute_sim::expected_transcript(
            &edgeroute_sim::SimConfig::default(),
            "sim-whisper",
            &a,
            None,
        )
        .unwrap();
        assert!(t.text.split_whitespace().count() >= 5, "{}", t.text);
    }

    /// The node's own parser reads the form back: the model, and the audio byte for byte.
    #[tokio::test]
    async fn the_node_reads_the_upload_as_sent() {
        let audio = clip(1, 1.0, CLIP_RATE);
        let (ct, body) = transcription_form("sim-whisper", "turn \"1\".wav", &audio);
        assert!(ct.starts_with("multipart/form-data; boundary=edgeroute-lab-"), "{ct}");
        let parsed = edgeroute_node::gateway::surface::parse_upload(
            Endpoint::Transcriptions,
            &ct,
            body.clone(),
        )
        .await
        .unwrap();
        let Parsed::Transcribe { model, audio: got, language, translate, .. } = parsed else {
            panic!("not a transcription: {parsed:?}")
        };
        assert_eq!(model, "sim-whisper");
        assert_eq!(&got[..], &audio[..]);
        assert_eq!((language, translate), (None, false));
        let text = String::from_utf8_lossy(&body);
        assert!(text.contains("filename=\"turn _1_.wav\""), "quotes replaced");
    }

    /// A boundary that occurs in the audio is never used.
    #[test]
    fn the_boundary_never_occurs_in_the_audio() {
        // The first boundary tried for 36 bytes of audio, inside 36 bytes of audio.
        let clash = format!("--edgeroute-lab-{:016x}", 36);
        let audio = [b"RIFF".as_slice(), clash.as_bytes()].concat();
        assert_eq!(audio.len(), 36);
        let (ct, body) = transcription_form("m", "a.wav", &audio);
        let boundary = ct.rsplit_once('=').unwrap().1;
        assert_ne!(format!("--{boundary}"), clash);
        let marker = format!("--{boundary}");
        let seen = body.windows(marker.len()).filter(|w| *w == marker.as_bytes()).count();
        assert_eq!(seen, 3, "two parts and the closing delimiter");
    }

    #[test]
    fn json_bodies_and_answers() {
        let v: serde_json::Value =
            serde_json::from_slice(&speech_body("t", "hi", "alloy")).unwrap();
        assert_eq!((v["model"].as_str(), v["response_format"].as_str()), (Some("t"), Some("wav")));
        edgeroute_node::gateway::surface::parse_speech(&speech_body("t", "hi", "alloy")).unwrap();
        edgeroute_node::gateway::surface::parse_embeddings(&embeddings_body("e", "hi")).unwrap();
        edgeroute_node::gateway::surface::parse_completions(&completions_body("c", "hi", 8), 64)
            .unwrap();
        assert_eq!(transcript_text(br#"{"text":"Hello there."}"#).as_deref(), Some("Hello there."));
        assert_eq!(transcript_text(b"not json"), None);
    }

    #[test]
    fn route_figures_are_read_from_an_exposition() {
        let text = "\
# HELP edgeroute_node_requests Requests answered, by route and status
# TYPE edgeroute_node_requests counter
edgeroute_node_requests_total{route=\"speech\",status=\"200\"} 7
edgeroute_node_requests_total{route=\"speech\",status=\"503\"} 2
edgeroute_node_requests_total{route=\"transcriptions\",status=\"200\"} 5
edgeroute_node_first_byte_seconds_sum{route=\"speech\"} 0.7
edgeroute_node_first_byte_seconds_count{route=\"speech\"} 7
edgeroute_node_first_byte_seconds_bucket{le=\"0.1\",route=\"speech\"} 7
# EOF
";
        let s = RouteFigures::of(text, "speech");
        assert_eq!((s.ok, s.first_bytes), (7.0, 7.0));
        assert!((s.mean_first_byte_ms().unwrap() - 100.0).abs() < 1e-9);
        assert_eq!(RouteFigures::of(text, "transcriptions").ok, 5.0);
        assert_eq!(RouteFigures::of(text, "embeddings"), RouteFigures::default());
        assert_eq!(RouteFigures::default().mean_first_byte_ms(), None);
        assert_eq!(
            metric_value(text, "edgeroute_node_requests_total", &[("route", "speech")]),
            9.0
        );
        let d = s.since(RouteFigures { ok: 2.0, first_bytes: 2.0, first_byte_s: 0.1 });
        assert_eq!(d.ok, 5.0);
        assert_eq!(d.plus(d).first_bytes, 10.0);
    }
}
