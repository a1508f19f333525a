//! `POST /v1/completions`: OpenAI's legacy text completions, on the chat engine.
//!
//! The prompt is answered as a chat of one user message with that text, so
//! `expected_completion` of that chat request predicts every token; the slot, queue, timing
//! and faults are chat's. `prompt` is a string, or an array of exactly one string (several
//! prompts or token arrays are a 400 naming `prompt`). `max_tokens` defaults to 16, as
//! OpenAI's and vLLM's do; `seed`, `stream` and `stream_options.include_usage` are honoured;
//! `echo`, `suffix`, `n`, `best_of`, `logprobs`, `stop`, `temperature` and the rest are
//! accepted and ignored. A streamed answer is SSE: a chunk per token
//! (`choices[0].text`), a final chunk with the finish reason, the usage chunk if asked for,
//! `data: [DONE]`; a failure after the first token is a final error event without `[DONE]`.

use std::convert::Infallible;

use axum::body::Body;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use edgeroute_proto::chat::StreamOptions;
use edgeroute_proto::{ChatCompletionRequest, ChatMessage, FinishReason, Role, Usage};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{ApiError, AppState, DONE, data_frame, error_frame, json_response, read_json, to_json};
use crate::engine::{Generation, SimEvent};
use crate::error::SimError;
use edgeroute_core::clock;

/// `max_tokens` when the request sets none: OpenAI's and vLLM's default for completions.
pub const DEFAULT_COMPLETION_MAX_TOKENS: u32 = 16;

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    model: String,
    prompt: Value,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
}

/// The one prompt of `prompt`.
fn the_prompt(prompt: Value) -> Result<String, ApiError> {
    let param = || Some("prompt".to_owned());
    match prompt {
        Value::String(s) => Ok(s),
        Value::Array(mut items) if items.len() == 1 && items[0].is_string() => {
            Ok(items.pop().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default())
        }
        Value::Array(items) if items.iter().all(Value::is_string) => Err(ApiError::invalid(
            "This server answers one prompt per request: send `prompt` as a string.",
            param(),
        )),
        Value::Array(_) => Err(ApiError::invalid(
            "Token arrays are not supported by this server: send `prompt` as text.",
            param(),
        )),
        _ => Err(ApiError::invalid("`prompt` must be a string.", param())),
    }
}

#[derive(Serialize)]
struct Choice<'a> {
    text: &'a str,
    index: u32,
    logprobs: Option<()>,
    finish_reason: Option<FinishReason>,
}

#[derive(Serialize)]
struct TextCompletion<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: Vec<Choice<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
}

/// What every chunk and the answer share.
struct Head {
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
}

impl Head {
    fn body<'a>(&'a self, choices: Vec<Choice<'a>>, usage: Option<Usage>) -> TextCompletion<'a> {
        TextCompletion {
            id: &self.id,
            object: "text_completion",
            created: self.created,
            model: &self.model,
            choices,
            usage,
        }
    }

    fn chunk(&self, text: &str, finish_reason: Option<FinishReason>) -> Bytes {
        let choice = Choice { text, index: 0, logprobs: None, finish_reason };
        data_frame(&to_json(&self.body(vec![choice], None))).freeze()
    }

    /// The finish chunk, the usage chunk if asked for, and `[DONE]`.
    fn finish(&self, reason: FinishReason, usage: Usage) -> Bytes {
        let mut b = data_frame(&to_json(&self.body(
            vec![Choice { text: "", index: 0, logprobs: None, finish_reason: Some(reason) }],
            None,
        )));
        if self.include_usage {
            b.extend_from_slice(&data_frame(&to_json(&self.body(vec![], Some(usage)))));
        }
        b.extend_from_slice(DONE);
        b.freeze()
    }
}

/// A context-window refusal names `prompt` here, not chat's `messages`.
fn from_sim(e: &SimError) -> ApiError {
    let mut err = ApiError::from_sim(e);
    if matches!(e, SimError::ContextLengthExceeded { .. }) {
        err.body.error.param = Some("prompt".into());
    }
    err
}

pub(super) async fn completions(
    State(st): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let req: CompletionRequest = match read_json(body) {
        Ok(r) => r,
        Err(refusal) => return refusal,
    };
    let prompt = match the_prompt(req.prompt) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let mut chat =
        ChatCompletionRequest::new(req.model, vec![ChatMessage::new(Role::User, prompt)]);
    chat.max_tokens = Some(req.max_tokens.unwrap_or(DEFAULT_COMPLETION_MAX_TOKENS));
    chat.seed = req.seed;
    let generation = match st.sim.generate(&chat).await {
        Ok(g) => g,
        Err(e) => return from_sim(&e).into_response(),
    };
    let head = Head {
        id: format!("cmpl-sim-{}", generation.request_id()),
        created: clock::unix_s(&st.clock),
        include_usage: req.stream_options.is_some_and(|o| o.include_usage),
        model: chat.model,
    };
    if req.stream {
        let body = futures_util::stream::unfold(
            (generation, head, false),
            |(mut generation, head, done): (Generation, Head, bool)| async move {
                if done {
                    return None;
                }
                let (frame, done) = match generation.next().await? {
                    Ok(SimEvent::Token(t)) => (head.chunk(t, None), false),
                    Ok(SimEvent::Finish { reason, usage }) => (head.finish(reason, usage), true),
                    Err(e) => (error_frame(&e), true),
                };
                Some((Ok::<_, Infallible>(frame), (generation, head, done)))
            },
        );
        let mut resp = Response::new(Body::from_stream(body));
        resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        resp.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        return resp;
    }
    match generation.into_completion().await {
        Ok(c) => {
            let choice = Choice {
                text: &c.text,
                index: 0,
                logprobs: None,
                finish_reason: Some(c.finish_reason),
            };
            json_response(StatusCode::OK, &head.body(vec![choice], Some(c.usage)))
        }
        Err(e) => from_sim(&e).into_response(),
    }
}

#[cfg(test)]
mod tests;
