//! Transcription, speech and embeddings on a paused tokio clock: every duration is exact.

use std::sync::Arc;

use bytes::Bytes;
use edgeroute_proto::{ChatCompletionRequest, ChatMessage, Role};
use futures_util::StreamExt;
use tokio::time::{Duration, Instant, timeout};

use crate::audio::{AudioFormat, parse_wav, wav_file};
use crate::config::{Faults, GpuConfig, SimConfig};
use crate::engine::{Simulator, SpeechStream};
use crate::error::SimError;
use crate::{expected_embedding, expected_speech, expected_transcript};

fn sim(cfg: SimConfig) -> Arc<Simulator> {
    Arc::new(Simulator::new(cfg).unwrap())
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// The default timing on one GPU with `slots`.
fn cfg(slots: u32) -> SimConfig {
    SimConfig { gpus: vec![GpuConfig { slots, ..GpuConfig::new("gpu0") }], ..SimConfig::default() }
}

fn faults(f: Faults) -> SimConfig {
    SimConfig { faults: f, ..SimConfig::zero_latency() }
}

/// `seconds` of 16 kHz mono WAV with a deterministic ramp of samples.
fn wav(seconds: u32) -> Vec<u8> {
    let samples: Vec<i16> = (0..16_000 * seconds).map(|i| (i % 2000) as i16 - 1000).collect();
    wav_file(16_000, &samples)
}

const M: &str = "sim-llama";

/// Reads a speech stream to its end: the chunks with their arrival times, and the error
/// that ended it, if any.
async fn drain(mut s: SpeechStream, t0: Instant) -> (Vec<(Duration, Bytes)>, Option<SimError>) {
    let mut chunks = Vec::new();
    while let Some(item) = s.next().await {
        match item {
            Ok(b) => chunks.push((t0.elapsed(), b)),
            Err(e) => {
                assert!(s.next().await.is_none(), "items after an error");
                return (chunks, Some(e));
            }
        }
    }
    (chunks, None)
}

fn joined(chunks: &[(Duration, Bytes)]) -> Vec<u8> {
    chunks.iter().flat_map(|(_, b)| b.to_vec()).collect()
}

#[tokio::test(start_paused = true)]
async fn transcription_takes_base_plus_per_second_of_audio() {
    // 50 ms + 30 ms × 10 s.
    let s = sim(cfg(1));
    let audio = wav(10);
    let t0 = Instant::now();
    let t = s.transcribe(M, &audio, Some("de")).await.unwrap();
    assert_eq!(t0.elapsed(), ms(350));
    assert_eq!(t, expected_transcript(s.config(), M, &audio, Some("de")).unwrap());
    assert_eq!((t.language.as_str(), t.duration_s, t.segments.len()), ("de", 10.0, 2));
    assert_eq!(s.in_flight(), 0);

    // Raw bytes: 1.5 s at 32000 bytes a second → 95 ms.
    let t0 = Instant::now();
    let t = s.transcribe(M, &[1u8; 48_000], None).await.unwrap();
    assert_eq!(t0.elapsed(), ms(95));
    assert_eq!(t.text.split(' ').count(), 4);
}

#[tokio::test(start_paused = true)]
async fn a_streamed_transcription_sends_each_word_as_it_is_decoded() {
    use crate::engine::TranscriptEvent;
    // 50 ms, then 30 ms per second of audio spread over the words: 350 ms in all, as whole.
    let s = sim(cfg(1));
    let audio = wav(10);
    let want = expected_transcript(s.config(), M, &audio, None).unwrap();
    let t0 = Instant::now();
    let mut words = s.transcribe_stream(M, &audio, None).unwrap();
    let mut text = String::new();
    let mut times = Vec::new();
    let done = loop {
        match words.next().await.unwrap().unwrap() {
            TranscriptEvent::Delta(w) => {
                text.push_str(&w);
                times.push(t0.elapsed());
            }
            TranscriptEvent::Done(t) => break t,
        }
    };
    assert!(words.next().await.is_none());
    assert_eq!(text, want.text);
    assert_eq!(done, want);
    assert_eq!(times.len(), want.text.split(' ').count());
    assert!(times[0] > ms(50) && times[0] < ms(70), "the first word early: {:?}", times[0]);
    let last = *times.last().unwrap();
    assert!(last >= ms(349) && last <= ms(351), "the last word when the whole is: {last:?}");
    assert!(times.windows(2).all(|w| w[0] <= w[1]));
    assert_eq!(s.in_flight(), 0, "the slot is back");
    // Faults count words: cut after 3.
    s.set_faults(Faults { cut_after_tokens: Some(3), ..Faults::default() }).unwrap();
    let mut words = s.transcribe_stream(M, &audio, None).unwrap();
    for _ in 0..3 {
        assert!(matches!(words.next().await, Some(Ok(TranscriptEvent::Delta(_)))));
    }
    assert!(matches!(words.next().await, Some(Err(SimError::Cut { after: 3 }))));
    assert!(words.next().await.is_none());
}

#[tokio::test(start_paused = true)]
async fn voice_requests_share_the_gpu_slots_and_queue_with_chat() {
    // One slot: a transcription holds it for 350 ms; an embedding and a chat queue behind.
    let s = sim(cfg(1));
    let t0 = Instant::now();
    let a = tokio::spawn({
        let s = Arc::clone(&s);
        async move { s.transcribe(M, &wav(10), None).await.map(|_| t0.elapsed()) }
    });
    tokio::task::yield_now().await;
    assert_eq!((s.in_flight(), s.queue_depth()), (1, 0));
    let b = tokio::spawn({
        let s = Arc::clone(&s);
        // 5 ms + 50 us × 2 tokens.
        async move { s.embed(M, &["12345678".into()], None).await.map(|_| t0.elapsed()) }
    });
    tokio::task::yield_now().await;
    let c = tokio::spawn({
        let s = Arc::clone(&s);
        let req = ChatCompletionRequest::new(M, vec![ChatMessage::new(Role::User, "hi")]);
        async move { s.generate(&req).await.map(|_| t0.elapsed()) }
    });
    tokio::task::yield_now().await;
    assert_eq!((s.in_flight(), s.queue_depth()), (1, 2));
    assert_eq!(s.gpu_status()[0].queued, 2);
    assert_eq!(a.await.unwrap().unwrap(), ms(350));
    // Tokio's timer rounds a deadline up to its millisecond: 355.1 ms is 356 ms.
    assert_eq!(b.await.unwrap().unwrap(), ms(356));
    // Chat's TTFT: 40 ms + 200 us × 5 prompt tokens.
    assert_eq!(c.await.unwrap().unwrap(), ms(397));
}

#[tokio::test(start_paused = true)]
async fn embeddings_are_the_expected_vectors_after_their_latency() {
    let s = sim(cfg(4));
    let inputs = vec!["hello".to_owned(), "world, again".to_owned(), "hello".to_owned()];
    let t0 = Instant::now();
    let v = s.embed(M, &inputs, Some(64)).await.unwrap();
    // 5 ms + 50 us × (2 + 3 + 2) tokens, rounded up to tokio's millisecond.
    assert_eq!(t0.elapsed(), ms(6));
    let t0 = Instant::now();
    s.embed(M, &["x".repeat(4 * 60)], Some(64)).await.unwrap();
    assert_eq!(t0.elapsed(), ms(8));
    assert_eq!(v.len(), 3);
    assert_eq!(v[0], expected_embedding(s.config(), M, "hello", Some(64)).unwrap());
    assert_eq!(v[0], v[2]);
    assert_ne!(v[0], v[1]);
    for x in &v {
        assert_eq!(x.len(), 64);
        let norm: f64 = x.iter().map(|c| f64::from(*c) * f64::from(*c)).sum();
        assert!((norm - 1.0).abs() < 1e-5);
    }
    assert_eq!(s.embed(M, &["x".into()], None).await.unwrap()[0].len(), 384);
}

#[tokio::test(start_paused = true)]
async fn speech_streams_the_expected_bytes_paced_like_real_time_tts() {
    // 15 characters: 1 s of audio, ten chunks of 100 ms (4800 bytes); the first at 80 ms,
    // then one every 10 ms (10× real time).
    let s = sim(cfg(1));
    let text = "fifteen chars!!";
    let t0 = Instant::now();
    let stream = s.speech(M, text, "alloy", AudioFormat::Wav).unwrap();
    assert_eq!(
        (stream.content_length(), stream.chunk_count(), stream.duration_s()),
        (48_044, 10, 1.0)
    );
    assert_eq!((stream.model(), stream.format()), (M, AudioFormat::Wav));
    assert_eq!(s.in_flight(), 1, "the slot is taken on arrival");
    let (chunks, end) = drain(stream, t0).await;
    assert_eq!(end, None);
    let times: Vec<_> = chunks.iter().map(|(t, _)| *t).collect();
    assert_eq!(times, (0..10).map(|i| ms(80 + 10 * i)).collect::<Vec<_>>());
    assert_eq!(chunks[0].1.len(), 44 + 4800);
    assert!(chunks[1..].iter().all(|(_, b)| b.len() == 4800));
    let body = joined(&chunks);
    assert_eq!(body, expected_speech(s.config(), M, text, "alloy", AudioFormat::Wav).unwrap());
    let info = parse_wav(&body).unwrap();
    assert_eq!((info.riff_size as usize, info.data_len), (body.len() - 8, body.len() - 44));
    assert_eq!(s.in_flight(), 0);

    // PCM: the same samples without the header; a last chunk that is not full.
    let text = "a".repeat(16);
    let t0 = Instant::now();
    let stream = s.speech(M, &text, "alloy", AudioFormat::Pcm).unwrap();
    assert_eq!((stream.content_length(), stream.chunk_count()), (51_200, 11));
    let (chunks, _) = drain(stream, t0).await;
    let (at, last) = chunks.last().unwrap();
    assert_eq!((*at, last.len()), (ms(180), 51_200 - 10 * 4800));
    let want = expected_speech(s.config(), M, &text, "alloy", AudioFormat::Pcm).unwrap();
    assert_eq!(joined(&chunks), want);
}

#[tokio::test(start_paused = true)]
async fn zero_latency_speech_and_a_realtime_factor_of_zero_send_at_once() {
    let s = sim(SimConfig::zero_latency());
    let t0 = Instant::now();
    let (chunks, end) = drain(s.speech(M, "hello world", "v", AudioFormat::Wav).unwrap(), t0).await;
    assert_eq!((end, t0.elapsed(), chunks.len()), (None, Duration::ZERO, 8));
}

#[tokio::test(start_paused = true)]
async fn a_queued_speech_stream_waits_for_its_slot_and_counts_in_the_queue() {
    // One slot, at most one waiting: the first speech holds the slot for 80 + 90 ms.
    let s = sim(SimConfig { max_queue: 1, ..cfg(1) });
    let t0 = Instant::now();
    let first = s.speech(M, &"a".repeat(15), "v", AudioFormat::Pcm).unwrap();
    let second = s.speech(M, &"b".repeat(15), "v", AudioFormat::Pcm).unwrap();
    assert_eq!((s.in_flight(), s.queue_depth()), (1, 1));
    // A third finds the queue full, at once.
    assert_eq!(
        s.speech(M, "c", "v", AudioFormat::Pcm).unwrap_err(),
        SimError::Overloaded { gpu: "gpu0".into(), queued: 1 }
    );
    let a = tokio::spawn(drain(first, t0));
    let b = tokio::spawn(drain(second, t0));
    let (a, _) = a.await.unwrap();
    let (b, _) = b.await.unwrap();
    assert_eq!((a[0].0, a[9].0), (ms(80), ms(170)));
    // Admitted when the first gave its slot back with its last chunk.
    assert_eq!((b[0].0, b[9].0), (ms(250), ms(340)));
    assert_eq!((s.in_flight(), s.queue_depth()), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn dropping_a_speech_stream_frees_its_slot_and_queue_place() {
    let s = sim(cfg(1));
    let first = s.speech(M, "hello", "v", AudioFormat::Wav).unwrap();
    let second = s.speech(M, "hello", "v", AudioFormat::Wav).unwrap();
    assert_eq!((s.in_flight(), s.queue_depth()), (1, 1));
    drop(second);
    assert_eq!(s.queue_depth(), 0);
    let mut first = first;
    first.next().await.unwrap().unwrap();
    drop(first);
    assert_eq!(s.in_flight(), 0);
    // Nothing leaked: the next one starts at once.
    let t0 = Instant::now();
    s.speech(M, "hi", "v", AudioFormat::Wav).unwrap().next().await.unwrap().unwrap();
    assert_eq!(t0.elapsed(), ms(80));
}

#[tokio::test(start_paused = true)]
async fn unknown_models_refusals_and_crashes_fail_every_kind_of_request_at_once() {
    let s = sim(SimConfig::zero_latency());
    let unknown = SimError::UnknownModel("nope".into());
    assert_eq!(s.transcribe("nope", &wav(1), None).await.unwrap_err(), unknown);
    assert_eq!(s.speech("nope", "hi", "v", AudioFormat::Wav).unwrap_err(), unknown);
    assert_eq!(s.embed("nope", &["x".into()], None).await.unwrap_err(), unknown);
    // An unloaded model is unknown too.
    assert!(s.unload_model(M));
    assert!(matches!(s.embed(M, &["x".into()], None).await, Err(SimError::UnknownModel(_))));

    for (f, e) in [
        (Faults { refuse_connections: true, ..Faults::default() }, SimError::Refused),
        (Faults { crash: true, ..Faults::default() }, SimError::Crashed),
    ] {
        let s = sim(faults(f));
        assert_eq!(s.transcribe(M, &wav(1), None).await.unwrap_err(), e);
        assert_eq!(s.speech(M, "hi", "v", AudioFormat::Wav).unwrap_err(), e);
        assert_eq!(s.embed(M, &["x".into()], None).await.unwrap_err(), e);
    }
}

#[tokio::test(start_paused = true)]
async fn invalid_input_is_refused_before_queueing_and_takes_no_request_number() {
    let s = sim(cfg(1));
    let bad_file = s.transcribe(M, b"RIFF\0\0\0\0WAVEjunk", None).await.unwrap_err();
    assert!(matches!(
        bad_file,
        SimError::InvalidInput { param: "file", code: "invalid_audio", .. }
    ));
    let long = s.transcribe(M, &vec![0u8; 32_000 * 601], None).await.unwrap_err();
    assert!(matches!(long, SimError::InvalidInput { param: "file", code: "audio_too_long", .. }));
    let lang = s.transcribe(M, &wav(1), Some("english")).await.unwrap_err();
    assert!(matches!(lang, SimError::InvalidInput { param: "language", .. }));
    let text = s.speech(M, &"x".repeat(4097), "v", AudioFormat::Wav).unwrap_err();
    assert!(matches!(text, SimError::InvalidInput { param: "input", code: "input_too_long", .. }));
    let dims = s.embed(M, &["x".into()], Some(5000)).await.unwrap_err();
    assert!(matches!(dims, SimError::InvalidInput { param: "dimensions", .. }));
    let many = s.embed(M, &vec!["x".into(); 2049], None).await.unwrap_err();
    assert!(matches!(many, SimError::InvalidInput { param: "input", code: "too_many_inputs", .. }));
    assert_eq!((s.in_flight(), s.queue_depth()), (0, 0));
    assert_eq!(s.speech(M, "ok", "v", AudioFormat::Pcm).unwrap().request_id(), 0);
    // The configured limit applies.
    let short = sim(SimConfig { max_audio_s: 2, ..SimConfig::zero_latency() });
    assert!(short.transcribe(M, &wav(2), None).await.is_ok());
    assert!(matches!(
        short.transcribe(M, &wav(3), None).await,
        Err(SimError::InvalidInput { code: "audio_too_long", .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn an_injected_error_fails_when_the_answer_was_due() {
    let f = Faults { error_rate: 1.0, ..Faults::default() };
    let s = sim(SimConfig { faults: f, ..cfg(1) });
    let t0 = Instant::now();
    assert_eq!(s.transcribe(M, &wav(10), None).await.unwrap_err(), SimError::Injected);
    assert_eq!(t0.elapsed(), ms(350));
    let t0 = Instant::now();
    assert_eq!(s.embed(M, &["abcd".repeat(20)], None).await.unwrap_err(), SimError::Injected);
    assert_eq!(t0.elapsed(), ms(6));
    let t0 = Instant::now();
    let (chunks, end) = drain(s.speech(M, "hello", "v", AudioFormat::Wav).unwrap(), t0).await;
    assert_eq!((chunks.len(), end, t0.elapsed()), (0, Some(SimError::Injected), ms(80)));
    assert_eq!(s.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn speech_stalls_and_cuts_count_chunks() {
    let text = "a".repeat(15); // ten chunks
    let s = sim(SimConfig {
        faults: Faults { cut_after_tokens: Some(3), ..Faults::default() },
        ..cfg(1)
    });
    let t0 = Instant::now();
    let (chunks, end) = drain(s.speech(M, &text, "v", AudioFormat::Wav).unwrap(), t0).await;
    assert_eq!((chunks.len(), end), (3, Some(SimError::Cut { after: 3 })));
    // Cut when the fourth chunk was due.
    assert_eq!(t0.elapsed(), ms(110));
    assert_eq!(s.in_flight(), 0);
    // A cut beyond the audio leaves it whole.
    s.set_faults(Faults { cut_after_tokens: Some(10), ..Faults::default() }).unwrap();
    let (chunks, end) = drain(s.speech(M, &text, "v", AudioFormat::Wav).unwrap(), t0).await;
    assert_eq!((chunks.len(), end), (10, None));
    s.set_faults(Faults { cut_after_tokens: Some(0), ..Faults::default() }).unwrap();
    let (chunks, end) = drain(s.speech(M, &text, "v", AudioFormat::Wav).unwrap(), t0).await;
    assert_eq!((chunks.len(), end), (0, Some(SimError::Cut { after: 0 })));

    s.set_faults(Faults { stall_after_tokens: Some(2), ..Faults::default() }).unwrap();
    let mut stream = s.speech(M, &text, "v", AudioFormat::Wav).unwrap();
    stream.next().await.unwrap().unwrap();
    stream.next().await.unwrap().unwrap();
    assert!(timeout(Duration::from_secs(3600), stream.next()).await.is_err());
    assert_eq!(s.in_flight(), 1, "a stalled stream keeps its slot");
    drop(stream);
    assert_eq!(s.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_crash_ends_speech_in_flight_and_in_the_queue() {
    let s = sim(cfg(1));
    let mut playing = s.speech(M, &"a".repeat(15), "v", AudioFormat::Wav).unwrap();
    let queued = s.speech(M, "b", "v", AudioFormat::Wav).unwrap();
    playing.next().await.unwrap().unwrap();
    let q = tokio::spawn(drain(queued, Instant::now()));
    tokio::task::yield_now().await;
    s.set_faults(Faults { crash: true, ..Faults::default() }).unwrap();
    assert_eq!(playing.next().await, Some(Err(SimError::Crashed)));
    assert_eq!(playing.next().await, None);
    assert_eq!(q.await.unwrap(), (vec![], Some(SimError::Crashed)));
    assert_eq!((s.in_flight(), s.queue_depth()), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn a_crash_fails_a_transcription_in_flight() {
    let s = sim(cfg(1));
    let t = tokio::spawn({
        let s = Arc::clone(&s);
        async move { s.transcribe(M, &wav(10), None).await }
    });
    tokio::time::sleep(ms(100)).await;
    s.set_faults(Faults { crash: true, ..Faults::default() }).unwrap();
    assert_eq!(t.await.unwrap().unwrap_err(), SimError::Crashed);
    assert_eq!(s.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn one_piece_answers_stall_or_cut_only_at_zero() {
    let s = sim(faults(Faults { stall_after_tokens: Some(0), ..Faults::default() }));
    assert!(timeout(Duration::from_secs(3600), s.transcribe(M, &wav(1), None)).await.is_err());
    assert!(timeout(Duration::from_secs(3600), s.embed(M, &["x".into()], None)).await.is_err());
    assert_eq!(s.in_flight(), 0, "the timed-out requests gave their slots back");
    s.set_faults(Faults { cut_after_tokens: Some(0), ..Faults::default() }).unwrap();
    assert_eq!(s.transcribe(M, &wav(1), None).await, Err(SimError::Cut { after: 0 }));
    assert_eq!(s.embed(M, &["x".into()], None).await, Err(SimError::Cut { after: 0 }));
    s.set_faults(Faults {
        stall_after_tokens: Some(1),
        cut_after_tokens: Some(1),
        ..Faults::default()
    })
    .unwrap();
    assert!(s.transcribe(M, &wav(1), None).await.is_ok());
    assert!(s.embed(M, &["x".into()], None).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn garbage_answers_keep_their_shape_but_not_their_content() {
    let s = sim(faults(Faults { garbage_rate: 1.0, ..Faults::default() }));
    let audio = wav(8);
    let want = expected_transcript(s.config(), M, &audio, None).unwrap();
    let a = s.transcribe(M, &audio, None).await.unwrap();
    let b = s.transcribe(M, &audio, None).await.unwrap();
    assert_ne!(a.text, want.text);
    assert_ne!(a.text, b.text, "each garbage answer differs");
    assert_eq!(a.text.split(' ').count(), want.text.split(' ').count());
    assert_eq!((a.duration_s, a.segments.len()), (want.duration_s, want.segments.len()));
    let v = s.embed(M, &["hello".into()], Some(16)).await.unwrap();
    assert_ne!(v[0], expected_embedding(s.config(), M, "hello", Some(16)).unwrap());
    assert_eq!(v[0].len(), 16);
    // Speech has no garbage mode: its bytes stay right.
    let (chunks, _) =
        drain(s.speech(M, "hi", "v", AudioFormat::Pcm).unwrap(), Instant::now()).await;
    assert_eq!(
        joined(&chunks),
        expected_speech(s.config(), M, "hi", "v", AudioFormat::Pcm).unwrap()
    );
}

#[tokio::test(start_paused = true)]
async fn error_rolls_are_deterministic_across_kinds_of_request() {
    // The same seed and arrival order fail the same requests, whatever their kind.
    let run = || async {
        let s = sim(faults(Faults { error_rate: 0.5, ..Faults::default() }));
        let mut out = Vec::new();
        for i in 0..24 {
            let failed = match i % 3 {
                0 => s.transcribe(M, &wav(1), None).await.is_err(),
                1 => s.embed(M, &["x".into()], None).await.is_err(),
                _ => drain(s.speech(M, "x", "v", AudioFormat::Pcm).unwrap(), Instant::now())
                    .await
                    .1
                    .is_some(),
            };
            out.push(failed);
        }
        out
    };
    let a = run().await;
    assert_eq!(a, run().await);
    assert!(a.contains(&true) && a.contains(&false), "{a:?}");
}

#[test]
fn a_speech_stream_can_be_an_http_body() {
    fn body<T: futures_util::Stream + Send + Unpin + 'static>() {}
    body::<SpeechStream>();
}
