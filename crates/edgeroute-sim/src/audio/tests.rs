//! WAV parsing, transcripts and speech samples: pure, so plain tests.

use super::*;

fn invalid(r: Result<impl std::fmt::Debug, SimError>) -> (&'static str, &'static str, String) {
    match r {
        Err(SimError::InvalidInput { param, code, message }) => (param, code, message),
        other => panic!("expected InvalidInput, got {other:?}"),
    }
}

/// A WAV file built chunk by chunk: `(id, body)` after the RIFF header, sizes written true.
fn riff(form: &[u8; 4], chunks: &[(&[u8; 4], Vec<u8>)]) -> Vec<u8> {
    let mut body = form.to_vec();
    for (id, data) in chunks {
        body.extend_from_slice(*id);
        body.extend_from_slice(&(data.len() as u32).to_le_bytes());
        body.extend_from_slice(data);
        if data.len() % 2 == 1 {
            body.push(0);
        }
    }
    let mut out = b"RIFF".to_vec();
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

fn fmt(tag: u16, channels: u16, rate: u32, bits: u16) -> Vec<u8> {
    let align = channels * bits / 8;
    let mut f = Vec::new();
    f.extend_from_slice(&tag.to_le_bytes());
    f.extend_from_slice(&channels.to_le_bytes());
    f.extend_from_slice(&rate.to_le_bytes());
    f.extend_from_slice(&(rate * u32::from(align)).to_le_bytes());
    f.extend_from_slice(&align.to_le_bytes());
    f.extend_from_slice(&bits.to_le_bytes());
    f
}

#[test]
fn a_wav_files_duration_comes_from_its_header() {
    let wav = wav_file(16_000, &vec![0; 24_000]);
    let info = parse_wav(&wav).unwrap();
    assert_eq!(
        (info.format_tag, info.channels, info.sample_rate, info.bits_per_sample, info.block_align),
        (1, 1, 16_000, 16, 2)
    );
    assert_eq!((info.data_offset, info.data_len), (44, 48_000));
    assert_eq!(info.riff_size as usize, wav.len() - 8);
    assert_eq!(audio_duration_s(&wav).unwrap(), 1.5);

    // Stereo 48 kHz float, with a LIST chunk of odd length (padded) before the data.
    let wav = riff(
        b"WAVE",
        &[(b"fmt ", fmt(3, 2, 48_000, 32)), (b"LIST", vec![1, 2, 3]), (b"data", vec![0; 8 * 4800])],
    );
    assert_eq!(audio_duration_s(&wav).unwrap(), 0.1);

    // A streamed WAV's unknown data size counts the bytes that are there.
    let mut streamed = wav_file(8_000, &[0; 800]);
    streamed[40..44].copy_from_slice(&u32::MAX.to_le_bytes());
    let info = parse_wav(&streamed).unwrap();
    assert_eq!((info.data_len, info.data_size_field), (1600, u32::MAX));
    assert_eq!(info.duration_s(), 0.1);
    // A trailing half frame is not a sample.
    let mut odd = wav_file(8_000, &[0; 800]);
    odd.push(0);
    odd[40..44].copy_from_slice(&1601u32.to_le_bytes());
    assert_eq!(audio_duration_s(&odd).unwrap(), 0.1);
}

#[test]
fn malformed_wav_files_are_refused_with_a_reason() {
    let good_fmt = || (b"fmt ", fmt(1, 1, 16_000, 16));
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"RIFF".to_vec(), "RIFF header"),
        (riff(b"AVI ", &[good_fmt()]), "not of form WAVE"),
        (riff(b"WAVE", &[(b"data", vec![0; 10])]), "before fmt"),
        (riff(b"WAVE", &[good_fmt()]), "no data chunk"),
        (riff(b"WAVE", &[(b"LIST", vec![0; 4])]), "no fmt chunk"),
        (riff(b"WAVE", &[(b"fmt ", vec![1, 0, 1, 0]), (b"data", vec![])]), "too short"),
        (riff(b"WAVE", &[(b"fmt ", fmt(1, 0, 16_000, 16)), (b"data", vec![])]), "0 channels"),
        (riff(b"WAVE", &[(b"fmt ", fmt(1, 1, 0, 16)), (b"data", vec![])]), "0 Hz"),
        // A chunk whose size runs past the end hides everything after it.
        (
            {
                let mut w = riff(b"WAVE", &[(b"LIST", vec![0; 4]), good_fmt()]);
                w[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
                w
            },
            "no fmt chunk",
        ),
    ];
    for (bytes, reason) in cases {
        let (param, code, message) = invalid(audio_duration_s(&bytes));
        assert_eq!((param, code), ("file", "invalid_audio"));
        assert!(message.contains(reason), "{message:?} should say {reason:?}");
    }
    assert_eq!(invalid(audio_duration_s(b"")).1, "invalid_audio");
}

#[test]
fn other_bytes_are_16_khz_16_bit_mono() {
    assert_eq!(audio_duration_s(&[7u8; 64_000]).unwrap(), 2.0);
    assert_eq!(audio_duration_s(b"x").unwrap(), 1.0 / 32_000.0);
    let (param, code, message) = invalid(checked_duration(&[0u8; 32_001], 1));
    assert_eq!((param, code), ("file", "audio_too_long"));
    assert!(message.contains("1 s"), "{message}");
    assert_eq!(checked_duration(&[0u8; 32_000], 1).unwrap(), 1.0);
}

#[test]
fn transcripts_follow_the_audio_deterministically() {
    let cfg = SimConfig::default();
    let audio = vec![3u8; 32_000 * 12];
    let t = expected_transcript(&cfg, "whisper", &audio, None).unwrap();
    assert_eq!(t, expected_transcript(&cfg, "whisper", &audio, None).unwrap());
    assert_eq!((t.language.as_str(), t.duration_s), ("en", 12.0));
    // 2.5 words a second: 30 words, over three segments of 4 s.
    assert_eq!(t.text.split(' ').count(), 30);
    let bounds: Vec<_> = t.segments.iter().map(|s| (s.id, s.start, s.end)).collect();
    assert_eq!(bounds, vec![(0, 0.0, 4.0), (1, 4.0, 8.0), (2, 8.0, 12.0)]);
    for s in &t.segments {
        assert_eq!(s.text.split(' ').count(), 10);
        assert!(s.text.starts_with(|c: char| c.is_uppercase()), "{}", s.text);
        assert!(s.text.ends_with('.') && !s.text[..s.text.len() - 1].contains('.'));
    }
    let joined: Vec<_> = t.segments.iter().map(|s| s.text.clone()).collect();
    assert_eq!(t.text, joined.join(" "));

    // Any byte, the model or the seed changes the words; the length stays.
    let mut other = audio.clone();
    other[100] = 4;
    let u = expected_transcript(&cfg, "whisper", &other, None).unwrap();
    assert_ne!(u.text, t.text);
    assert_eq!(u.text.split(' ').count(), 30);
    assert_ne!(expected_transcript(&cfg, "whisper-2", &audio, None).unwrap().text, t.text);
    let seeded = SimConfig { seed: 3, ..SimConfig::default() };
    assert_ne!(expected_transcript(&seeded, "whisper", &audio, None).unwrap().text, t.text);
}

#[test]
fn word_and_segment_counts_scale_with_duration() {
    let words = |seconds: f64| {
        let t = transcript(1, seconds, "en".into());
        (t.text.split_whitespace().count(), t.segments.len())
    };
    assert_eq!(words(0.0), (0, 0));
    assert_eq!(words(0.01), (1, 1));
    assert_eq!(words(1.0), (3, 1));
    assert_eq!(words(5.0), (13, 1));
    assert_eq!(words(5.01), (13, 2));
    assert_eq!(words(600.0), (1500, 120));
    // Short audio still makes a sentence.
    let t = transcript(9, 0.2, "de".into());
    assert_eq!(t.segments[0].end, 0.2);
    assert!(t.text.ends_with('.'));
    // A WAV file with no samples is silence: no words.
    let cfg = SimConfig::default();
    let silent = expected_transcript(&cfg, "m", &wav_file(16_000, &[]), None).unwrap();
    assert_eq!((silent.text.as_str(), silent.duration_s, silent.segments.len()), ("", 0.0, 0));
}

#[test]
fn language_hints_are_codes() {
    assert_eq!(check_language(None).unwrap(), "en");
    assert_eq!(check_language(Some("DE")).unwrap(), "de");
    assert_eq!(check_language(Some("yue")).unwrap(), "yue");
    for bad in ["", "e", "english", "e1", "zh-CN"] {
        assert_eq!(invalid(check_language(Some(bad))).0, "language", "{bad}");
    }
}

#[test]
fn speech_is_a_valid_wav_whose_length_follows_the_text() {
    let cfg = SimConfig::default();
    let text = "Hello there, voice agent!"; // 25 characters
    let wav = expected_speech(&cfg, "tts", text, "alloy", AudioFormat::Wav).unwrap();
    assert_eq!(wav.len(), 44 + 25 * 1600 * 2);
    let info = parse_wav(&wav).unwrap();
    assert_eq!(
        (info.format_tag, info.channels, info.sample_rate, info.bits_per_sample, info.block_align),
        (1, 1, SPEECH_SAMPLE_RATE, 16, 2)
    );
    // The header's sizes are the real ones.
    assert_eq!(info.riff_size as usize, wav.len() - 8);
    assert_eq!(info.data_size_field as usize, wav.len() - 44);
    assert_eq!(info.data_len, wav.len() - 44);
    assert!((info.duration_s() - 25.0 / 15.0).abs() < 1e-9);
    // It transcribes as audio of that length.
    let t = expected_transcript(&cfg, "whisper", &wav, None).unwrap();
    assert_eq!(t.text.split(' ').count(), 4);

    let pcm = expected_speech(&cfg, "tts", text, "alloy", AudioFormat::Pcm).unwrap();
    assert_eq!(pcm, wav[44..]);
    assert_eq!(pcm, expected_speech(&cfg, "tts", text, "alloy", AudioFormat::Pcm).unwrap());
    // Another voice is another pitch; the length stays.
    let other = expected_speech(&cfg, "tts", text, "echo", AudioFormat::Pcm).unwrap();
    assert_eq!(other.len(), pcm.len());
    assert_ne!(other, pcm);
    // Unicode counts in characters.
    assert_eq!(expected_speech(&cfg, "tts", "héllo", "v", AudioFormat::Pcm).unwrap().len(), 16_000);
}

#[test]
fn speech_samples_are_a_quiet_tone_with_silent_spaces() {
    let cfg = SimConfig::default();
    let pcm = expected_speech(&cfg, "tts", "ab c", "alloy", AudioFormat::Pcm).unwrap();
    let samples: Vec<i16> = pcm.chunks_exact(2).map(|b| i16::from_le_bytes([b[0], b[1]])).collect();
    let per = SAMPLES_PER_CHAR as usize;
    assert!(samples[2 * per..3 * per].iter().all(|s| *s == 0), "the space is silent");
    for c in [0, 1, 3] {
        let part = &samples[c * per..(c + 1) * per];
        let peak = part.iter().map(|s| s.unsigned_abs()).max().unwrap();
        assert!((700..=3200).contains(&peak), "char {c}: peak {peak}");
        // Ramped in and out: no click at the edges.
        assert!(part[0].unsigned_abs() < 50 && part[per - 1].unsigned_abs() < 50);
        // Between 100 and 299 Hz: 13 to 40 sign changes over 1/15 s.
        let crossings = part.windows(2).filter(|w| (w[0] < 0) != (w[1] < 0)).count();
        assert!((12..=41).contains(&crossings), "char {c}: {crossings} crossings");
    }
    assert!((half_sine(0.5) - 1.0).abs() < 1e-12 && half_sine(0.0) == 0.0);
    assert!((half_sine(1.0 / 6.0) - 0.5).abs() < 0.002);
}

#[test]
fn speech_input_limits() {
    let cfg = SimConfig::default();
    let max = "a".repeat(MAX_SPEECH_INPUT_CHARS);
    assert_eq!(
        expected_speech(&cfg, "tts", &max, "v", AudioFormat::Pcm).unwrap().len(),
        MAX_SPEECH_INPUT_CHARS * 3200
    );
    let long = "é".repeat(MAX_SPEECH_INPUT_CHARS + 1);
    let (param, code, message) =
        invalid(expected_speech(&cfg, "tts", &long, "v", AudioFormat::Wav));
    assert_eq!((param, code), ("input", "input_too_long"));
    assert!(message.contains("4097") && message.contains("4096"), "{message}");
    assert_eq!(invalid(expected_speech(&cfg, "tts", "", "v", AudioFormat::Wav)).0, "input");
    assert_eq!(invalid(expected_speech(&cfg, "tts", "hi", "", AudioFormat::Wav)).0, "voice");
}

#[test]
fn audio_format_is_lowercase_on_the_wire() {
    assert_eq!(serde_json::to_string(&AudioFormat::Wav).unwrap(), r#""wav""#);
    assert_eq!(serde_json::from_str::<AudioFormat>(r#""pcm""#).unwrap(), AudioFormat::Pcm);
    assert!(serde_json::from_str::<AudioFormat>(r#""mp3""#).is_err());
    assert_eq!(
        (AudioFormat::Wav.content_type(), AudioFormat::Pcm.content_type()),
        ("audio/wav", "audio/pcm")
    );
}
