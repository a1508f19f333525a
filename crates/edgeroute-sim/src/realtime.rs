//! A realtime session (OpenAI's realtime event protocol) on the simulator: JSON events in,
//! JSON events out, over channels — the node bridges them to a WebSocket in process, the
//! standalone server serves them at `GET /v1/realtime`.
//!
//! What a session does, with OpenAI's event names:
//!
//! - opens with `session.created` (`turn_detection: null`: the client commits its audio; the
//!   simulator has no voice activity detection and refuses `server_vad` with an `error`);
//! - `session.update` changes the instructions, voice, modalities, temperature and output
//!   budget (`session.updated`); audio formats other than `pcm16` are refused;
//! - `input_audio_buffer.append` collects base64 PCM16 (24 kHz mono) up to `max_audio_s`;
//!   `commit` transcribes it on a GPU slot (the simulator's transcription: its latency, faults
//!   and deterministic words), answering `input_audio_buffer.committed`,
//!   `conversation.item.created` (the user's item, its transcript inside) and
//!   `conversation.item.input_audio_transcription.completed`; `clear` empties it;
//! - `conversation.item.create` adds a message (text, or audio transcribed as above),
//!   `conversation.item.delete` removes one;
//! - `response.create` answers the conversation: the chat engine's answer for it (slot,
//!   TTFT, token pace, faults: a failure ends the response `failed`), as
//!   `response.audio_transcript.delta` and, a sentence at a time, `response.audio.delta`
//!   (PCM16 at 24 kHz, the speech engine's samples), or `response.text.delta` for a text-only
//!   response; then the `.done` events and `response.done` with usage. One response at a
//!   time (`conversation_already_has_active_response`); `response.cancel` ends it
//!   `cancelled`;
//! - anything else, or malformed JSON, is an `error` event naming it; the session goes on.
//!
//! The session ends when the inbound channel closes; a response under way is dropped with it
//! (its slot returns at once).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::BytesMut;
use edgeroute_proto::ChatCompletionRequest;
use edgeroute_proto::realtime::{TextItem, error_event, event_type};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::audio::{AudioFormat, SPEECH_SAMPLE_RATE, Speech, wav_file};
use crate::engine::{SimEvent, Simulator};
use crate::error::SimError;

/// Bytes per second of the session's audio (PCM16 mono at 24 kHz).
const PCM_BYTES_PER_S: usize = 2 * SPEECH_SAMPLE_RATE as usize;
/// Audio per `response.audio.delta`, ms.
const AUDIO_DELTA_MS: u64 = 100;

/// Event and item numbers of one session, shared with its response task.
#[derive(Debug)]
struct Ids {
    session: u64,
    next: AtomicU64,
}

impl Ids {
    fn event(&self) -> String {
        format!("event_{}_{}", self.session, self.next.fetch_add(1, Ordering::Relaxed))
    }
    fn item(&self) -> String {
        format!("item_{}_{}", self.session, self.next.fetch_add(1, Ordering::Relaxed))
    }
    fn response(&self) -> String {
        format!("resp_{}_{}", self.session, self.next.fetch_add(1, Ordering::Relaxed))
    }
}

/// The session's settings as `session.created` reports them.
#[derive(Debug, Clone)]
struct Settings {
    instructions: String,
    voice: String,
    audio: bool,
    temperature: f64,
    max_output_tokens: Option<u32>,
}

/// One conversation item: the event's item as sent, and its text for the chat engine.
#[derive(Debug, Clone)]
struct Item {
    id: String,
    role: String,
    text: String,
}

/// A response under way: its task, and the text said so far (kept if it is cancelled).
struct Active {
    id: String,
    item_id: String,
    said: Arc<Mutex<String>>,
    task: JoinHandle<Result<(), SimError>>,
}

/// Runs one session until `inbound` closes. `session` numbers its ids.
pub async fn run(
    sim: Arc<Simulator>,
    model: String,
    session: u64,
    mut inbound: mpsc::Receiver<String>,
    out: mpsc::Sender<String>,
) {
    let ids = Arc::new(Ids { session, next: AtomicU64::new(1) });
    let mut s = Session {
        sim,
        model,
        ids,
        out,
        settings: Settings {
            instructions: String::new(),
            voice: "alloy".into(),
            audio: true,
            temperature: 0.8,
            max_output_tokens: None,
        },
        items: Vec::new(),
        buffer: BytesMut::new(),
        active: None,
    };
    s.emit(json!({"type": "session.created", "session": s.describe()})).await;
    loop {
        let finished = async {
            match s.active.as_mut() {
                Some(a) => (&mut a.task).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            msg = inbound.recv() => match msg {
                Some(text) => s.on_text(&text).await,
                None => break,
            },
            _ = finished => s.finish_active(),
        }
    }
    if let Some(a) = s.active.take() {
        a.task.abort();
    }
}

struct Session {
    sim: Arc<Simulator>,
    model: String,
    ids: Arc<Ids>,
    out: mpsc::Sender<String>,
    settings: Settings,
    items: Vec<Item>,
    buffer: BytesMut,
    active: Option<Active>,
}

/// A refusal of a client event: `error` with this code, message and param.
struct Refusal {
    code: &'static str,
    message: String,
    param: Option<&'static str>,
}

fn refuse(code: &'static str, param: Option<&'static str>, message: impl Into<String>) -> Refusal {
    Refusal { code, message: message.into(), param }
}

impl Session {
    async fn emit(&self, mut v: Value) {
        v["event_id"] = self.ids.event().into();
        let _ = self.out.send(v.to_string()).await;
    }

    fn describe(&self) -> Value {
        let s = &self.settings;
        json!({
            "id": format!("sess_{}", self.ids.session),
            "object": "realtime.session",
            "model": self.model,
            "modalities": if s.audio { json!(["audio", "text"]) } else { json!(["text"]) },
            "instructions": s.instructions,
            "voice": s.voice,
            "input_audio_format": "pcm16",
            "output_audio_format": "pcm16",
            "input_audio_transcription": null,
            "turn_detection": null,
            "tools": [],
            "tool_choice": "auto",
            "temperature": s.temperature,
            "max_response_output_tokens": s.max_output_tokens.map_or(json!("inf"), |n| json!(n)),
        })
    }

    async fn on_text(&mut self, text: &str) {
        let v: Value = match serde_json::from_str(text) {
            Ok(v @ Value::Object(_)) => v,
            _ => {
                let e = refuse("invalid_json", None, "An event is one JSON object.");
                return self.refused(e, None).await;
            }
        };
        let client_id = v.get("event_id").and_then(Value::as_str).map(str::to_owned);
        if let Err(e) = self.on_event(&v).await {
            self.refused(e, client_id.as_deref()).await;
        }
    }

    async fn refused(&self, e: Refusal, client_event: Option<&str>) {
        let v = error_event(
            &self.ids.event(),
            "invalid_request_error",
            e.code,
            &e.message,
            e.param,
            client_event,
        );
        let _ = self.out.send(v.to_string()).await;
    }

    async fn on_event(&mut self, v: &Value) -> Result<(), Refusal> {
        match event_type(v) {
            Some("session.update") => {
                let patch = v.get("session").unwrap_or(&Value::Null);
                self.settings = updated(&self.settings, patch)?;
                self.emit(json!({"type": "session.updated", "session": self.describe()})).await;
            }
            Some("input_audio_buffer.append") => {
                let audio = v.get("audio").and_then(Value::as_str).ok_or_else(|| {
                    refuse("missing_required_parameter", Some("audio"), "`audio` is required.")
                })?;
                let bytes = B64.decode(audio).map_err(|e| {
                    refuse("invalid_value", Some("audio"), format!("Not base64: {e}."))
                })?;
                let max = self.sim.config().max_audio_s as usize * PCM_BYTES_PER_S;
                if self.buffer.len() + bytes.len() > max {
                    return Err(refuse(
                        "input_audio_buffer_too_large",
                        Some("audio"),
                        format!(
                            "The buffer would exceed {} s of audio; commit or clear it.",
                            self.sim.config().max_audio_s
                        ),
                    ));
                }
                self.buffer.extend_from_slice(&bytes);
            }
            Some("input_audio_buffer.clear") => {
                self.buffer.clear();
                self.emit(json!({"type": "input_audio_buffer.cleared"})).await;
            }
            Some("input_audio_buffer.commit") => {
                if self.buffer.len() < 2 {
                    return Err(refuse(
                        "input_audio_buffer_commit_empty",
                        None,
                        "The input audio buffer is empty.",
                    ));
                }
                let pcm = self.buffer.split().freeze();
                let item_id = self.ids.item();
                let previous = self.items.last().map(|i| i.id.clone());
                self.emit(json!({"type": "input_audio_buffer.committed",
                    "previous_item_id": previous, "item_id": item_id}))
                    .await;
                let transcript = self.transcribe(&pcm).await?;
                let item = json!({"id": item_id, "object": "realtime.item", "type": "message",
                    "role": "user", "status": "completed",
                    "content": [{"type": "input_audio", "transcript": transcript}]});
                self.push(item_id.clone(), "user", transcript.clone(), item, previous).await;
                self.emit(json!({"type": "conversation.item.input_audio_transcription.completed",
                    "item_id": item_id, "content_index": 0, "transcript": transcript}))
                    .await;
            }
            Some("conversation.item.create") => {
                let item = v.get("item").ok_or_else(|| {
                    refuse("missing_required_parameter", Some("item"), "`item` is required.")
                })?;
                self.create_item(item).await?;
            }
            Some("conversation.item.delete") => {
                let id = v.get("item_id").and_then(Value::as_str).unwrap_or_default();
                let Some(i) = self.items.iter().position(|it| it.id == id) else {
                    return Err(refuse(
                        "item_not_found",
                        Some("item_id"),
                        format!("No item `{id}` in the conversation."),
                    ));
                };
                self.items.remove(i);
                self.emit(json!({"type": "conversation.item.deleted", "item_id": id})).await;
            }
            Some("response.create") => self.respond(v.get("response")).await?,
            Some("response.cancel") => {
                let Some(a) = self.active.take() else {
                    return Err(refuse(
                        "response_cancel_not_active",
                        None,
                        "There is no response in progress.",
                    ));
                };
                a.task.abort();
                let said = a.said.lock().map(|s| s.clone()).unwrap_or_default();
                self.keep_answer(&a.item_id, &said);
                let done = response_done(&a.id, "cancelled", vec![], None);
                self.emit(done).await;
            }
            Some(other) => {
                return Err(refuse(
                    "invalid_event_type",
                    Some("type"),
                    format!("`{other}` is not an event this server takes."),
                ));
            }
            None => return Err(refuse("invalid_event", Some("type"), "The event has no `type`.")),
        }
        Ok(())
    }

    /// Transcribes PCM16 at 24 kHz on the simulator (a slot, its latency, its faults).
    async fn transcribe(&self, pcm: &[u8]) -> Result<String, Refusal> {
        let samples: Vec<i16> =
            pcm.chunks_exact(2).map(|b| i16::from_le_bytes([b[0], b[1]])).collect();
        let wav = wav_file(SPEECH_SAMPLE_RATE, &samples);
        match self.sim.transcribe(&self.model, &wav, None).await {
            Ok(t) => Ok(t.text),
            Err(e) => Err(refuse("transcription_failed", None, e.to_string())),
        }
    }

    async fn create_item(&mut self, item: &Value) -> Result<(), Refusal> {
        let kind = item.get("type").and_then(Value::as_str).unwrap_or("message");
        if kind != "message" {
            return Err(refuse(
                "invalid_value",
                Some("item.type"),
                "Only `message` items are simulated (no tools).",
            ));
        }
        let role = item.get("role").and_then(Value::as_str).unwrap_or_default();
        if !["user", "assistant", "system"].contains(&role) {
            return Err(refuse(
                "invalid_value",
                Some("item.role"),
                "`role` is one of user, assistant, system.",
            ));
        }
        let mut item = item.clone();
        // Audio parts without a transcript are transcribed here.
        if let Some(parts) = item.get_mut("content").and_then(Value::as_array_mut) {
            for part in parts {
                if let Some(audio) = part.get("audio").and_then(Value::as_str) {
                    let pcm = B64.decode(audio).map_err(|e| {
                        refuse("invalid_value", Some("item.content.audio"), format!("{e}"))
                    })?;
                    let t = self.transcribe(&pcm).await?;
                    part["transcript"] = t.into();
                    part.as_object_mut().map(|o| o.remove("audio"));
                }
            }
        }
        let text = TextItem::of(&item).map(|t| t.text).ok_or_else(|| {
            refuse("invalid_value", Some("item.content"), "The message has no text or audio.")
        })?;
        let id = match item.get("id").and_then(Value::as_str) {
            Some(id) if !id.is_empty() && id.len() <= 64 => id.to_owned(),
            _ => self.ids.item(),
        };
        if self.items.iter().any(|i| i.id == id) {
            return Err(refuse(
                "item_already_exists",
                Some("item.id"),
                format!("`{id}` is already in the conversation."),
            ));
        }
        item["id"] = id.clone().into();
        item["object"] = "realtime.item".into();
        item["status"] = "completed".into();
        let previous = self.items.last().map(|i| i.id.clone());
        self.push(id, role, text, item, previous).await;
        Ok(())
    }

    async fn push(
        &mut self,
        id: String,
        role: &str,
        text: String,
        item: Value,
        previous: Option<String>,
    ) {
        self.items.push(Item { id, role: role.to_owned(), text });
        self.emit(json!({"type": "conversation.item.created",
            "previous_item_id": previous, "item": item}))
            .await;
    }

    fn keep_answer(&mut self, item_id: &str, said: &str) {
        if !said.is_empty() {
            self.items.push(Item {
                id: item_id.to_owned(),
                role: "assistant".into(),
                text: said.to_owned(),
            });
        }
    }

    /// The response task ended (completed or failed): its words join the conversation.
    fn finish_active(&mut self) {
        if let Some(a) = self.active.take() {
            let said = a.said.lock().map(|s| s.clone()).unwrap_or_default();
            self.keep_answer(&a.item_id, &said);
        }
    }

    async fn respond(&mut self, opts: Option<&Value>) -> Result<(), Refusal> {
        if self.active.is_some() {
            return Err(refuse(
                "conversation_already_has_active_response",
                None,
                "A response is in progress; wait for response.done or cancel it.",
            ));
        }
        let settings = match opts {
            Some(patch) => updated(&self.settings, patch)?,
            None => self.settings.clone(),
        };
        let mut messages = Vec::new();
        if !settings.instructions.is_empty() {
            messages.push(json!({"role": "system", "content": settings.instructions}));
        }
        for i in &self.items {
            messages.push(json!({"role": i.role, "content": i.text}));
        }
        if !self.items.iter().any(|i| i.role == "user") {
            messages.push(json!({"role": "user", "content": ""}));
        }
        let mut req = json!({"model": self.model, "messages": messages});
        if let Some(n) = settings.max_output_tokens {
            req["max_tokens"] = n.into();
        }
        let req: ChatCompletionRequest = serde_json::from_value(req)
            .map_err(|e| refuse("invalid_value", None, format!("{e}")))?;
        let said = Arc::new(Mutex::new(String::new()));
        let (id, item_id) = (self.ids.response(), self.ids.item());
        let previous = self.items.last().map(|i| i.id.clone());
        let run = Respond {
            sim: self.sim.clone(),
            model: self.model.clone(),
            ids: self.ids.clone(),
            out: self.out.clone(),
            id: id.clone(),
            item_id: item_id.clone(),
            previous,
            settings,
            said: said.clone(),
        };
        let task = tokio::spawn(run.run(req));
        self.active = Some(Active { id, item_id, said, task });
        Ok(())
    }
}

/// `settings` with a `session.update`'s (or `response.create`'s) fields applied.
fn updated(settings: &Settings, patch: &Value) -> Result<Settings, Refusal> {
    let mut s = settings.clone();
    if !patch.is_object() {
        return Err(refuse("invalid_value", Some("session"), "`session` is an object."));
    }
    if let Some(v) = patch.get("instructions") {
        s.instructions = v
            .as_str()
            .ok_or_else(|| refuse("invalid_type", Some("instructions"), "A string."))?
            .to_owned();
    }
    if let Some(v) = patch.get("voice") {
        let voice = v.as_str().filter(|v| !v.is_empty() && v.len() <= 64);
        s.voice = voice
            .ok_or_else(|| refuse("invalid_value", Some("voice"), "A voice name."))?
            .to_owned();
    }
    if let Some(v) = patch.get("modalities") {
        let list: Vec<&str> =
            v.as_array().map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
        s.audio = match (list.contains(&"text"), list.contains(&"audio"), list.len()) {
            (true, false, 1) => false,
            (true, true, 2) => true,
            _ => {
                return Err(refuse(
                    "invalid_value",
                    Some("modalities"),
                    "`[\"text\"]` or `[\"audio\", \"text\"]`.",
                ));
            }
        };
    }
    for key in ["input_audio_format", "output_audio_format"] {
        if let Some(v) = patch.get(key)
            && v.as_str() != Some("pcm16")
        {
            return Err(refuse(
                "invalid_value",
                Some("format"),
                "The simulator speaks pcm16 only.",
            ));
        }
    }
    if let Some(v) = patch.get("turn_detection")
        && !v.is_null()
    {
        return Err(refuse(
            "unsupported_turn_detection",
            Some("turn_detection"),
            "The simulator has no voice activity detection: set turn_detection to null and \
             send input_audio_buffer.commit at the end of each turn.",
        ));
    }
    if let Some(v) = patch.get("temperature") {
        s.temperature = v
            .as_f64()
            .filter(|t| (0.0..=2.0).contains(t))
            .ok_or_else(|| refuse("invalid_value", Some("temperature"), "Between 0 and 2."))?;
    }
    if let Some(v) = patch.get("max_response_output_tokens").or(patch.get("max_output_tokens")) {
        s.max_output_tokens = match v {
            Value::String(inf) if inf == "inf" => None,
            v => Some(v.as_u64().filter(|n| (1..=4096).contains(n)).map(|n| n as u32).ok_or_else(
                || refuse("invalid_value", Some("max_response_output_tokens"), "1 to 4096."),
            )?),
        };
    }
    Ok(s)
}

fn response_done(id: &str, status: &str, output: Vec<Value>, usage: Option<Value>) -> Value {
    json!({"type": "response.done", "response": {
        "id": id, "object": "realtime.response", "status": status,
        "output": output, "usage": usage}})
}

/// `response.done` for a response the engine failed (a crash, an injected error, a cut).
fn response_failed(id: &str, e: &SimError) -> Value {
    let mut done = response_done(id, "failed", vec![], None);
    done["response"]["status_details"] = json!({"type": "failed",
        "error": {"type": "server_error", "code": "backend_failed", "message": e.to_string()}});
    done
}

/// One response, as a task: events out as the engine produces them.
struct Respond {
    sim: Arc<Simulator>,
    model: String,
    ids: Arc<Ids>,
    out: mpsc::Sender<String>,
    id: String,
    item_id: String,
    previous: Option<String>,
    settings: Settings,
    said: Arc<Mutex<String>>,
}

impl Respond {
    async fn emit(&self, mut v: Value) {
        v["event_id"] = self.ids.event().into();
        let _ = self.out.send(v.to_string()).await;
    }

    fn ids(&self, v: &mut Value) {
        v["response_id"] = self.id.clone().into();
        v["item_id"] = self.item_id.clone().into();
        v["output_index"] = 0.into();
        v["content_index"] = 0.into();
    }

    async fn part(&self, kind: &str, mut v: Value) {
        v["type"] = kind.into();
        self.ids(&mut v);
        self.emit(v).await;
    }

    async fn run(self, req: ChatCompletionRequest) -> Result<(), SimError> {
        self.emit(json!({"type": "response.created", "response": {"id": self.id,
            "object": "realtime.response", "status": "in_progress", "output": []}}))
            .await;
        let mut generation = match self.sim.generate(&req).await {
            Ok(g) => g,
            Err(e) => {
                self.emit(response_failed(&self.id, &e)).await;
                return Err(e);
            }
        };
        let audio = self.settings.audio;
        let delta_kind =
            if audio { "response.audio_transcript.delta" } else { "response.text.delta" };
        let item = json!({"id": self.item_id, "object": "realtime.item", "type": "message",
            "role": "assistant", "status": "in_progress", "content": []});
        self.emit(json!({"type": "response.output_item.added", "response_id": self.id,
            "output_index": 0, "item": item}))
            .await;
        self.emit(json!({"type": "conversation.item.created",
            "previous_item_id": self.previous, "item": item}))
            .await;
        let empty = if audio {
            json!({"type": "audio", "transcript": ""})
        } else {
            json!({"type": "text", "text": ""})
        };
        self.part("response.content_part.added", json!({"part": empty})).await;
        let mut text = String::new();
        let mut sentence = String::new();
        let mut usage = None;
        while let Some(ev) = generation.next().await {
            match ev {
                Ok(SimEvent::Token(t)) => {
                    text.push_str(t);
                    if let Ok(mut s) = self.said.lock() {
                        s.push_str(t);
                    }
                    self.part(delta_kind, json!({"delta": t})).await;
                    if audio {
                        sentence.push_str(t);
                        if t.ends_with(['.', '!', '?']) {
                            self.speak(&std::mem::take(&mut sentence)).await;
                        }
                    }
                }
                Ok(SimEvent::Finish { usage: u, .. }) => {
                    usage = Some(json!({"total_tokens": u.total_tokens,
                        "input_tokens": u.prompt_tokens, "output_tokens": u.completion_tokens}));
                }
                Err(e) => {
                    self.emit(response_failed(&self.id, &e)).await;
                    return Err(e);
                }
            }
        }
        if audio && !sentence.trim().is_empty() {
            self.speak(&sentence).await;
        }
        let content = if audio {
            self.part("response.audio.done", json!({})).await;
            self.part("response.audio_transcript.done", json!({"transcript": text})).await;
            json!({"type": "audio", "transcript": text})
        } else {
            self.part("response.text.done", json!({"text": text})).await;
            json!({"type": "text", "text": text})
        };
        self.part("response.content_part.done", json!({"part": content})).await;
        let done_item = json!({"id": self.item_id, "object": "realtime.item", "type": "message",
            "role": "assistant", "status": "completed", "content": [content]});
        self.emit(json!({"type": "response.output_item.done", "response_id": self.id,
            "output_index": 0, "item": done_item}))
            .await;
        self.emit(response_done(&self.id, "completed", vec![done_item], usage)).await;
        Ok(())
    }

    /// A sentence's audio: the speech engine's samples (no slot: the answer's own slot
    /// speaks), in `response.audio.delta`s of 100 ms.
    async fn speak(&self, sentence: &str) {
        let sentence = sentence.trim();
        if sentence.is_empty() {
            return;
        }
        let seed = self.sim.config().seed;
        let Ok(speech) =
            Speech::new(seed, &self.model, sentence, &self.settings.voice, AudioFormat::Pcm)
        else {
            return;
        };
        let step = u64::from(SPEECH_SAMPLE_RATE) * AUDIO_DELTA_MS / 1000;
        let mut at = 0;
        while at < speech.samples() {
            let mut buf = BytesMut::new();
            speech.put_samples(at, at + step, &mut buf);
            at += step;
            self.part("response.audio.delta", json!({"delta": B64.encode(&buf)})).await;
        }
    }
}

#[cfg(test)]
mod tests;
