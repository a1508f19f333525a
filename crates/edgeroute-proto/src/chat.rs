//! OpenAI-compatible chat completion schemas (`POST /v1/chat/completions`).
//!
//! Fields edgeroute interprets are typed; everything else a client sends (tools,
//! response_format, logit_bias, vendor extensions such as vLLM's `continue_final_message`)
//! is kept in `extra` and forwarded untouched to OpenAI-compatible upstreams.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A chat completion request as clients send it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stream: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<Stop>,
    /// vLLM/SGLang extension: continue the trailing assistant message instead of starting a
    /// new one. edgeroute's simulator honours it too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub continue_final_message: Option<bool>,
    /// Everything else, forwarded as is.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    Developer,
    User,
    Assistant,
    Tool,
    Function,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    #[serde(default)]
    pub content: Option<Content>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl ChatMessage {
    pub fn new(role: Role, text: impl Into<String>) -> Self {
        ChatMessage {
            role,
            content: Some(Content::Text(text.into())),
            name: None,
            extra: Map::new(),
        }
    }

    /// The message's text: a plain string, or the text parts of a multi-part content joined.
    pub fn text(&self) -> String {
        match &self.content {
            None => String::new(),
            Some(Content::Text(t)) => t.clone(),
            Some(Content::Parts(parts)) => {
                parts.iter().filter_map(|p| p.text.as_deref()).collect::<Vec<_>>().join("")
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl ChatCompletionRequest {
    pub fn new(model: impl Into<String>, messages: Vec<ChatMessage>) -> Self {
        ChatCompletionRequest {
            model: model.into(),
            messages,
            stream: false,
            stream_options: None,
            max_tokens: None,
            max_completion_tokens: None,
            temperature: None,
            top_p: None,
            n: None,
            seed: None,
            stop: None,
            continue_final_message: None,
            extra: Map::new(),
        }
    }

    /// The completion-token cap: `max_completion_tokens` wins over the legacy `max_tokens`.
    pub fn token_limit(&self) -> Option<u32> {
        self.max_completion_tokens.or(self.max_tokens)
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options.is_some_and(|o| o.include_usage)
    }

    /// Checks what serde cannot: the shape rules OpenAI enforces with a 400.
    /// Returns the offending parameter and a message.
    pub fn validate(&self) -> Result<(), InvalidRequest> {
        let bad =
            |param: &str, message: String| Err(InvalidRequest { param: param.to_owned(), message });
        if self.model.trim().is_empty() {
            return bad("model", "you must provide a model parameter".into());
        }
        if self.messages.is_empty() {
            return bad("messages", "'messages' must contain at least one message".into());
        }
        for (name, v) in
            [("max_tokens", self.max_tokens), ("max_completion_tokens", self.max_completion_tokens)]
        {
            if v == Some(0) {
                return bad(name, format!("'{name}' must be at least 1"));
            }
        }
        if let Some(t) = self.temperature
            && !(0.0..=2.0).contains(&t)
        {
            return bad("temperature", format!("{t} is not in [0, 2]"));
        }
        if let Some(p) = self.top_p
            && !(0.0..=1.0).contains(&p)
        {
            return bad("top_p", format!("{p} is not in [0, 1]"));
        }
        if self.n == Some(0) {
            return bad("n", "'n' must be at least 1".into());
        }
        if self.stream_options.is_some() && !self.stream {
            return bad(
                "stream_options",
                "'stream_options' is only allowed when 'stream' is true".into(),
            );
        }
        Ok(())
    }
}

/// A request that parsed but breaks a shape rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct InvalidRequest {
    pub param: String,
    pub message: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
}

impl Usage {
    pub fn new(prompt_tokens: u32, completion_tokens: u32) -> Self {
        Usage { prompt_tokens, completion_tokens, total_tokens: prompt_tokens + completion_tokens }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Stop,
    Length,
    ToolCalls,
    ContentFilter,
}

/// A non-streaming response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletion {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<Choice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_fingerprint: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Choice {
    pub index: u32,
    pub message: AssistantMessage,
    pub finish_reason: Option<FinishReason>,
    #[serde(default)]
    pub logprobs: Option<Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AssistantMessage {
    pub role: Role,
    pub content: Option<String>,
}

/// One streamed chunk (`data: {chunk}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionChunk {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChunkChoice>,
    /// With `stream_options.include_usage`, every chunk carries `"usage": null` and one last
    /// chunk with empty `choices` carries the totals, as OpenAI does.
    #[serde(default, skip_serializing_if = "UsageField::is_absent")]
    pub usage: UsageField,
}

/// Distinguishes "no usage key" from `"usage": null` from a value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum UsageField {
    #[default]
    Absent,
    Null,
    Value(Usage),
}

impl UsageField {
    fn is_absent(&self) -> bool {
        matches!(self, UsageField::Absent)
    }
}

impl Serialize for UsageField {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            UsageField::Absent | UsageField::Null => s.serialize_none(),
            UsageField::Value(u) => u.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for UsageField {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match Option::<Usage>::deserialize(d)? {
            None => UsageField::Null,
            Some(u) => UsageField::Value(u),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChunkChoice {
    pub index: u32,
    pub delta: Delta,
    pub finish_reason: Option<FinishReason>,
    #[serde(default)]
    pub logprobs: Option<Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Delta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// Builds the chunks of one streamed answer in OpenAI's order: a role chunk, content chunks,
/// a finish chunk, and (with `include_usage`) a usage chunk.
#[derive(Debug, Clone)]
pub struct ChunkBuilder {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub include_usage: bool,
}

impl ChunkBuilder {
    fn chunk(&self, delta: Delta, finish_reason: Option<FinishReason>) -> ChatCompletionChunk {
        ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk".into(),
            created: self.created,
            model: self.model.clone(),
            choices: vec![ChunkChoice { index: 0, delta, finish_reason, logprobs: None }],
            usage: if self.include_usage { UsageField::Null } else { UsageField::Absent },
        }
    }

    pub fn role(&self) -> ChatCompletionChunk {
        self.chunk(Delta { role: Some(Role::Assistant), content: Some(String::new()) }, None)
    }

    pub fn content(&self, text: impl Into<String>) -> ChatCompletionChunk {
        self.chunk(Delta { role: None, content: Some(text.into()) }, None)
    }

    pub fn finish(&self, reason: FinishReason) -> ChatCompletionChunk {
        self.chunk(Delta::default(), Some(reason))
    }

    /// The trailing usage chunk, or `None` when the client did not ask for it.
    pub fn usage(&self, usage: Usage) -> Option<ChatCompletionChunk> {
        self.include_usage.then(|| ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk".into(),
            created: self.created,
            model: self.model.clone(),
            choices: vec![],
            usage: UsageField::Value(usage),
        })
    }

    pub fn completion(&self, text: String, reason: FinishReason, usage: Usage) -> ChatCompletion {
        ChatCompletion {
            id: self.id.clone(),
            object: "chat.completion".into(),
            created: self.created,
            model: self.model.clone(),
            choices: vec![Choice {
                index: 0,
                message: AssistantMessage { role: Role::Assistant, content: Some(text) },
                finish_reason: Some(reason),
                logprobs: None,
            }],
            usage: Some(usage),
            system_fingerprint: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_survive_a_round_trip() {
        let raw = r#"{"model":"m","messages":[{"role":"user","content":"hi","x":1}],
            "tools":[{"type":"function"}],"temperature":0.5}"#;
        let req: ChatCompletionRequest = serde_json::from_str(raw).unwrap();
        assert_eq!(req.extra["tools"][0]["type"], "function");
        assert_eq!(req.messages[0].extra["x"], 1);
        let back = serde_json::to_value(&req).unwrap();
        assert_eq!(back["tools"][0]["type"], "function");
        assert_eq!(back["temperature"], 0.5);
        assert!(back.get("stream").is_none());
    }

    #[test]
    fn validation_names_the_parameter() {
        let mut req = ChatCompletionRequest::new("m", vec![]);
        assert_eq!(req.validate().unwrap_err().param, "messages");
        req.messages.push(ChatMessage::new(Role::User, "hi"));
        req.max_tokens = Some(0);
        assert_eq!(req.validate().unwrap_err().param, "max_tokens");
        req.max_tokens = Some(5);
        req.max_completion_tokens = Some(3);
        assert_eq!(req.token_limit(), Some(3));
        req.temperature = Some(2.5);
        assert_eq!(req.validate().unwrap_err().param, "temperature");
    }

    #[test]
    fn chunks_follow_openai_usage_convention() {
        let b =
            ChunkBuilder { id: "c1".into(), created: 1, model: "m".into(), include_usage: true };
        let v = serde_json::to_value(b.content("x")).unwrap();
        assert!(v["usage"].is_null() && v.as_object().unwrap().contains_key("usage"));
        let u = serde_json::to_value(b.usage(Usage::new(3, 4)).unwrap()).unwrap();
        assert_eq!(u["usage"]["total_tokens"], 7);
        assert_eq!(u["choices"].as_array().unwrap().len(), 0);
        let nb = ChunkBuilder { include_usage: false, ..b };
        let v = serde_json::to_value(nb.finish(FinishReason::Length)).unwrap();
        assert!(!v.as_object().unwrap().contains_key("usage"));
        assert_eq!(v["choices"][0]["finish_reason"], "length");
    }

    #[test]
    fn multipart_content_text_is_joined() {
        let raw = r#"{"role":"user","content":[{"type":"text","text":"a"},{"type":"image_url","image_url":{}},{"type":"text","text":"b"}]}"#;
        let m: ChatMessage = serde_json::from_str(raw).unwrap();
        assert_eq!(m.text(), "ab");
    }
}
