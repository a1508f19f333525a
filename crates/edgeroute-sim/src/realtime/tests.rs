//! Realtime sessions over channels on a paused clock.

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::{Duration, timeout};

use super::run;
use crate::audio::wav_file;
use crate::config::{Faults, SimConfig};
use crate::engine::Simulator;
use crate::{expected_answer, expected_speech, expected_transcript};

const M: &str = "sim-llama";

struct Client {
    tx: mpsc::Sender<String>,
    rx: mpsc::Receiver<String>,
}

impl Client {
    fn open(sim: Arc<Simulator>) -> Client {
        let (tx, inbound) = mpsc::channel(64);
        let (out, rx) = mpsc::channel(1024);
        tokio::spawn(run(sim, M.into(), 7, inbound, out));
        Client { tx, rx }
    }

    async fn send(&self, v: Value) {
        self.tx.send(v.to_string()).await.unwrap();
    }

    async fn next(&mut self) -> Value {
        let text = timeout(Duration::from_secs(600), self.rx.recv()).await.unwrap().unwrap();
        serde_json::from_str(&text).unwrap()
    }

    /// Events until one of type `until` (included).
    async fn until(&mut self, until: &str) -> Vec<Value> {
        let mut seen = Vec::new();
        loop {
            let v = self.next().await;
            let done = v["type"] == until;
            seen.push(v);
            if done {
                return seen;
            }
        }
    }
}

fn types(events: &[Value]) -> Vec<&str> {
    events.iter().map(|e| e["type"].as_str().unwrap()).collect()
}

fn sim(cfg: SimConfig) -> Arc<Simulator> {
    Arc::new(Simulator::new(cfg).unwrap())
}

fn user(text: &str) -> Value {
    json!({"type": "conversation.item.create",
        "item": {"type": "message", "role": "user",
                 "content": [{"type": "input_text", "text": text}]}})
}

#[tokio::test(start_paused = true)]
async fn a_text_turn_is_answered_with_the_chat_engines_words_and_their_audio() {
    let s = sim(SimConfig::default());
    let mut c = Client::open(s.clone());
    let created = c.next().await;
    assert_eq!(created["type"], "session.created");
    assert_eq!(created["session"]["model"], M);
    assert!(created["session"]["turn_detection"].is_null());
    c.send(user("What is the weather in Toronto?")).await;
    let item = c.until("conversation.item.created").await;
    assert_eq!(item[0]["item"]["role"], "user");
    c.send(json!({"type": "response.create"})).await;
    let events = c.until("response.done").await;
    let t = types(&events);
    assert_eq!(
        t[..4],
        [
            "response.created",
            "response.output_item.added",
            "conversation.item.created",
            "response.content_part.added"
        ]
    );
    assert_eq!(
        t[t.len() - 5..],
        [
            "response.audio.done",
            "response.audio_transcript.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.done"
        ]
    );
    // The words are the chat engine's for the same conversation.
    let req = serde_json::from_value(json!({"model": M,
        "messages": [{"role": "user", "content": "What is the weather in Toronto?"}]}))
    .unwrap();
    let expected = expected_answer(s.config(), &req).concat();
    let said: String = events
        .iter()
        .filter(|e| e["type"] == "response.audio_transcript.delta")
        .map(|e| e["delta"].as_str().unwrap())
        .collect();
    assert_eq!(said, expected);
    let done = events.last().unwrap();
    assert_eq!(done["response"]["status"], "completed");
    assert_eq!(done["response"]["output"][0]["content"][0]["transcript"], expected.as_str());
    assert!(done["response"]["usage"]["output_tokens"].as_u64().unwrap() > 0);
    // The audio: each sentence spoken by the speech engine, PCM16 at 24 kHz.
    let audio: Vec<u8> = events
        .iter()
        .filter(|e| e["type"] == "response.audio.delta")
        .flat_map(|e| B64.decode(e["delta"].as_str().unwrap()).unwrap())
        .collect();
    let mut want = Vec::new();
    let mut sentence = String::new();
    for piece in expected_answer(s.config(), &req) {
        sentence.push_str(&piece);
        if piece.ends_with(['.', '!', '?']) {
            let t = std::mem::take(&mut sentence);
            want.extend(
                expected_speech(s.config(), M, t.trim(), "alloy", crate::AudioFormat::Pcm).unwrap(),
            );
        }
    }
    if !sentence.trim().is_empty() {
        want.extend(
            expected_speech(s.config(), M, sentence.trim(), "alloy", crate::AudioFormat::Pcm)
                .unwrap(),
        );
    }
    assert_eq!(audio.len(), want.len());
    assert!(audio == want, "the audio is the speech engine's");
    // The answer joined the conversation: a second turn sees it.
    c.send(user("And tomorrow?")).await;
    c.until("conversation.item.created").await;
    c.send(json!({"type": "response.create", "response": {"modalities": ["text"]}})).await;
    let events = c.until("response.done").await;
    assert!(types(&events).contains(&"response.text.delta"));
    assert!(!types(&events).contains(&"response.audio.delta"));
    let req = serde_json::from_value(json!({"model": M, "messages": [
        {"role": "user", "content": "What is the weather in Toronto?"},
        {"role": "assistant", "content": expected},
        {"role": "user", "content": "And tomorrow?"}]}))
    .unwrap();
    let done = events.last().unwrap();
    assert_eq!(
        done["response"]["output"][0]["content"][0]["text"],
        expected_answer(s.config(), &req).concat().as_str()
    );
}

#[tokio::test(start_paused = true)]
async fn committed_audio_is_transcribed_into_the_users_item() {
    let s = sim(SimConfig::zero_latency());
    let mut c = Client::open(s.clone());
    c.next().await;
    let samples: Vec<i16> = (0..24_000 * 2).map(|i| (i % 3000) as i16 - 1500).collect();
    let pcm: Vec<u8> = samples.iter().flat_map(|s| s.to_le_bytes()).collect();
    for chunk in pcm.chunks(9600) {
        c.send(json!({"type": "input_audio_buffer.append", "audio": B64.encode(chunk)})).await;
    }
    c.send(json!({"type": "input_audio_buffer.commit"})).await;
    let events = c.until("conversation.item.input_audio_transcription.completed").await;
    assert_eq!(
        types(&events),
        [
            "input_audio_buffer.committed",
            "conversation.item.created",
            "conversation.item.input_audio_transcription.completed"
        ]
    );
    let want = expected_transcript(s.config(), M, &wav_file(24_000, &samples), None).unwrap();
    assert_eq!(events[2]["transcript"], want.text.as_str());
    assert_eq!(events[1]["item"]["content"][0]["transcript"], want.text.as_str());
    // An empty buffer cannot be committed.
    c.send(json!({"type": "input_audio_buffer.commit", "event_id": "mine"})).await;
    let e = c.next().await;
    assert_eq!(e["type"], "error");
    assert_eq!(e["error"]["code"], "input_audio_buffer_commit_empty");
    assert_eq!(e["error"]["event_id"], "mine");
}

#[tokio::test(start_paused = true)]
async fn bad_events_are_errors_and_the_session_goes_on() {
    let mut c = Client::open(sim(SimConfig::zero_latency()));
    c.next().await;
    c.tx.send("{not json".into()).await.unwrap();
    assert_eq!(c.next().await["error"]["code"], "invalid_json");
    c.send(json!({"type": "no.such.event"})).await;
    assert_eq!(c.next().await["error"]["code"], "invalid_event_type");
    c.send(json!({"type": "input_audio_buffer.append", "audio": "%%%"})).await;
    assert_eq!(c.next().await["error"]["param"], "audio");
    c.send(
        json!({"type": "session.update", "session": {"turn_detection": {"type": "server_vad"}}}),
    )
    .await;
    assert_eq!(c.next().await["error"]["code"], "unsupported_turn_detection");
    c.send(json!({"type": "session.update", "session": {"output_audio_format": "g711_ulaw"}}))
        .await;
    assert_eq!(c.next().await["error"]["param"], "format");
    c.send(json!({"type": "response.cancel"})).await;
    assert_eq!(c.next().await["error"]["code"], "response_cancel_not_active");
    c.send(json!({"type": "session.update", "session": {"voice": "verse", "instructions": "Be brief."}}))
        .await;
    let v = c.next().await;
    assert_eq!(v["type"], "session.updated");
    assert_eq!(v["session"]["voice"], "verse");
}

#[tokio::test(start_paused = true)]
async fn one_response_at_a_time_and_cancel_ends_it() {
    // Slow tokens: the response is still under way when the next events arrive.
    let s = sim(SimConfig { tokens_per_s: 5.0, ..SimConfig::default() });
    let mut c = Client::open(s);
    c.next().await;
    c.send(user("Tell me a long story.")).await;
    c.until("conversation.item.created").await;
    c.send(json!({"type": "response.create"})).await;
    c.until("response.audio_transcript.delta").await;
    c.send(json!({"type": "response.create"})).await;
    let e = c.until("error").await;
    assert_eq!(e.last().unwrap()["error"]["code"], "conversation_already_has_active_response");
    c.send(json!({"type": "response.cancel"})).await;
    let done = c.until("response.done").await;
    assert_eq!(done.last().unwrap()["response"]["status"], "cancelled");
    // Another response may start now.
    c.send(json!({"type": "response.create"})).await;
    assert_eq!(c.next().await["type"], "response.created");
}

#[tokio::test(start_paused = true)]
async fn a_crash_fails_the_response_not_the_session() {
    let s = sim(SimConfig::zero_latency());
    let mut c = Client::open(s.clone());
    c.next().await;
    c.send(user("Hello.")).await;
    c.until("conversation.item.created").await;
    s.set_faults(Faults { crash: true, ..Faults::default() }).unwrap();
    c.send(json!({"type": "response.create"})).await;
    let done = c.until("response.done").await;
    let r = &done.last().unwrap()["response"];
    assert_eq!(r["status"], "failed");
    assert_eq!(r["status_details"]["error"]["type"], "server_error");
    s.set_faults(Faults::default()).unwrap();
    c.send(json!({"type": "response.create"})).await;
    let done = c.until("response.done").await;
    assert_eq!(done.last().unwrap()["response"]["status"], "completed");
}
