//! Continuing a chat answer through an upstream's `/v1/completions`: the chat request becomes
//! a completion request on a rendered prompt, and the completion answer (JSON or SSE chunks)
//! becomes the chat answer the client asked for. Pure functions over bytes.

use bytes::{Bytes, BytesMut};
use edgeroute_proto::ChatCompletionRequest;
use edgeroute_proto::sse::{SseDecoder, SseEvent, data_frame};
use serde_json::{Map, Value, json};

/// Chat-only fields that mean nothing (or something else) to a completions endpoint.
const CHAT_ONLY: &[&str] = &[
    "add_generation_prompt",
    "chat_template",
    "chat_template_kwargs",
    "documents",
    "function_call",
    "functions",
    "logprobs",
    "parallel_tool_calls",
    "response_format",
    "tool_choice",
    "tools",
    "top_logprobs",
];

/// The completion request that continues `req`'s final message from `prompt`.
pub fn request(req: &ChatCompletionRequest, upstream_model: &str, prompt: String) -> Bytes {
    let mut body = Map::new();
    for (k, v) in &req.extra {
        if !CHAT_ONLY.contains(&k.as_str()) {
            body.insert(k.clone(), v.clone());
        }
    }
    body.insert("model".into(), upstream_model.into());
    body.insert("prompt".into(), prompt.into());
    body.insert("stream".into(), req.stream.into());
    if let Some(o) = req.stream_options.filter(|_| req.stream) {
        body.insert("stream_options".into(), json!({ "include_usage": o.include_usage }));
    }
    if let Some(m) = req.max_completion_tokens.or(req.max_tokens) {
        body.insert("max_tokens".into(), m.into());
    }
    let opt = |v: Option<Value>| v.filter(|v| !v.is_null());
    for (k, v) in [
        ("temperature", opt(req.temperature.map(Value::from))),
        ("top_p", opt(req.top_p.map(Value::from))),
        ("n", opt(req.n.map(Value::from))),
        ("seed", opt(req.seed.map(Value::from))),
        ("stop", req.stop.as_ref().and_then(|s| serde_json::to_value(s).ok())),
    ] {
        if let Some(v) = v {
            body.insert(k.into(), v);
        }
    }
    Bytes::from(Value::Object(body).to_string())
}

/// How the translated answer is labelled: the node's response id and the model the client
/// asked for (not the upstream's name for it).
#[derive(Debug, Clone)]
pub struct Label<'a> {
    pub id: &'a str,
    pub created: u64,
    pub model: &'a str,
}

impl Label<'_> {
    /// A chat object of kind `object` around `choices`, with the upstream's usage if any.
    fn wrap(&self, object: &str, choices: Vec<Value>, usage: &Value) -> Value {
        let mut out = json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        if !usage.is_null() {
            out["usage"] = usage.clone();
        }
        out
    }
}

/// A `text_completion` JSON answer as a `chat.completion`.
pub fn chat_json(body: &[u8], label: &Label<'_>) -> Result<Bytes, String> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| format!("the upstream's completion is not JSON: {e}"))?;
    let choices = v["choices"]
        .as_array()
        .ok_or("the upstream's completion has no choices")?
        .iter()
        .map(|c| {
            json!({
                "index": c["index"].as_u64().unwrap_or(0),
                "message": { "role": "assistant", "content": c["text"].as_str().unwrap_or("") },
                "finish_reason": c["finish_reason"],
            })
        })
        .collect::<Vec<_>>();
    Ok(Bytes::from(label.wrap("chat.completion", choices, &v["usage"]).to_string()))
}

/// Turns `text_completion` stream chunks into `chat.completion.chunk`s, event by event.
#[derive(Debug, Default)]
pub struct ChunkTranslator {
    /// Choice indexes that have had their first chunk (which carries `role`).
    started: Vec<u64>,
}

impl ChunkTranslator {
    /// Translates a batch of whole SSE data events (as the upstream framed them) into chat
    /// chunk events; returns the frames and how many events they hold.
    pub fn frames(&mut self, raw: &[u8], label: &Label<'_>) -> Result<(Bytes, u32), String> {
        let mut dec = SseDecoder::new(raw.len() + 2);
        dec.push(raw);
        dec.push(b"\n\n");
        let mut out = BytesMut::new();
        let mut n = 0;
        while let Some(ev) = dec.next_event().map_err(|e| e.to_string())? {
            let SseEvent::Data(payload) = ev else { continue };
            out.extend_from_slice(&data_frame(self.chunk(&payload, label)?.as_bytes()));
            n += 1;
        }
        Ok((out.freeze(), n))
    }

    fn chunk(&mut self, payload: &[u8], label: &Label<'_>) -> Result<String, String> {
        let v: Value = serde_json::from_slice(payload)
            .map_err(|e| format!("the upstream sent a malformed completion chunk: {e}"))?;
        let choices = v["choices"]
            .as_array()
            .map(|cs| {
                cs.iter()
                    .map(|c| {
                        let index = c["index"].as_u64().unwrap_or(0);
                        let mut delta = Map::new();
                        if !self.started.contains(&index) {
                            self.started.push(index);
                            delta.insert("role".into(), "assistant".into());
                        }
                        let text = c["text"].as_str().unwrap_or("");
                        if !text.is_empty() || c["finish_reason"].is_null() {
                            delta.insert("content".into(), text.into());
                        }
                        json!({ "index": index, "delta": delta, "finish_reason": c["finish_reason"] })
                    })
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        Ok(label.wrap("chat.completion.chunk", choices, &v["usage"]).to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgeroute_proto::chat::{ChatMessage, Role};

    const LABEL: Label<'static> = Label { id: "chatcmpl-1", created: 7, model: "smollm2" };

    #[test]
    fn a_chat_request_becomes_a_completion_request_on_the_prompt() {
        let mut req = ChatCompletionRequest::new(
            "smollm2",
            vec![ChatMessage::new(Role::User, "hi"), ChatMessage::new(Role::Assistant, "Hel")],
        );
        req.stream = true;
        req.max_completion_tokens = Some(9);
        req.max_tokens = Some(99);
        req.temperature = Some(0.0);
        req.seed = Some(3);
        req.continue_final_message = Some(true);
        req.extra.insert("add_generation_prompt".into(), false.into());
        req.extra.insert("top_k".into(), 1.into());
        req.extra.insert("tools".into(), json!([]));
        let v: Value =
            serde_json::from_slice(&request(&req, "smol-upstream", "PROMPT".into())).unwrap();
        assert_eq!(
            v,
            json!({"model": "smol-upstream", "prompt": "PROMPT", "stream": true, "max_tokens": 9,
                   "temperature": 0.0, "seed": 3, "top_k": 1})
        );
    }

    #[test]
    fn a_completion_answer_becomes_a_chat_answer() {
        let body = br#"{"id":"cmpl-9","object":"text_completion","created":1,"model":"x",
            "choices":[{"text":"lo there","index":0,"logprobs":null,"finish_reason":"stop"}],
            "usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}"#;
        let v: Value = serde_json::from_slice(&chat_json(body, &LABEL).unwrap()).unwrap();
        assert_eq!(v["id"], "chatcmpl-1");
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["model"], "smollm2");
        assert_eq!(v["choices"][0]["message"], json!({"role": "assistant", "content": "lo there"}));
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert_eq!(v["usage"]["completion_tokens"], 2);
        assert!(chat_json(b"{]", &LABEL).is_err());
    }

    #[test]
    fn completion_chunks_become_chat_chunks() {
        let raw = b"data: {\"choices\":[{\"text\":\"lo\",\"index\":0,\"finish_reason\":null}]}\n\n\
                    data: {\"choices\":[{\"text\":\" there\",\"index\":0,\"finish_reason\":null}]}\n\n";
        let mut t = ChunkTranslator::default();
        let (frames, n) = t.frames(raw, &LABEL).unwrap();
        assert_eq!(n, 2);
        let mut dec = SseDecoder::new(1 << 20);
        dec.push(&frames);
        let mut deltas = vec![];
        while let Some(SseEvent::Data(d)) = dec.next_event().unwrap() {
            let v: Value = serde_json::from_slice(&d).unwrap();
            assert_eq!(v["object"], "chat.completion.chunk");
            assert_eq!(v["id"], "chatcmpl-1");
            deltas.push(v["choices"][0]["delta"].clone());
        }
        assert_eq!(
            deltas,
            vec![json!({"role": "assistant", "content": "lo"}), json!({"content": " there"})]
        );
        let end = b"data: {\"choices\":[{\"text\":\"\",\"index\":0,\"finish_reason\":\"stop\"}],\"usage\":{\"completion_tokens\":2}}\n\n";
        let (frames, _) = t.frames(end, &LABEL).unwrap();
        let text = String::from_utf8(frames.to_vec()).unwrap();
        assert!(text.contains(r#""delta":{},"finish_reason":"stop""#), "{text}");
        assert!(text.contains(r#""usage":{"completion_tokens":2}"#), "{text}");
        assert!(t.frames(b"data: {nope\n\n", &LABEL).is_err());
    }
}
