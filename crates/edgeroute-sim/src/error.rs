//! Why a simulated request failed.
//!
//! The variants map one to one onto what a real backend does wrong, so the gateway can tell a
//! client error (unknown model, a prompt beyond the context window) from backend trouble
//! (overload, injected error, refusal, crash, cut stream). Which HTTP status each becomes is
//! the caller's decision; the standalone server's choice is in `server`.

/// A simulated request's failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SimError {
    /// No model with this id is loaded.
    #[error("the model `{0}` does not exist or is not loaded")]
    UnknownModel(String),
    /// The prompt plus the requested completion budget does not fit the model's context
    /// window. Raised before the request queues, so it costs no slot and no time. The message
    /// is OpenAI's and vLLM's wording, which clients match on.
    #[error("{}", context_message(.window, .prompt_tokens, .requested))]
    ContextLengthExceeded {
        model: String,
        /// The model's context window, in tokens.
        window: u32,
        /// The prompt, as [`crate::prompt_tokens`] counts it.
        prompt_tokens: u32,
        /// The completion budget asked for (`max_completion_tokens`, else `max_tokens`);
        /// `None` when the request set neither, so the prompt alone did not fit.
        requested: Option<u32>,
    },
    /// The model's GPU has every slot busy and `max_queue` requests already waiting.
    #[error("GPU `{gpu}` is overloaded: {queued} requests already waiting")]
    Overloaded { gpu: String, queued: u32 },
    /// `faults.error_rate` picked this request to fail before its first token.
    #[error("injected backend error")]
    Injected,
    /// `faults.refuse_connections` is set.
    #[error("backend refused the connection")]
    Refused,
    /// `faults.crash` is set, or was set while this request was in flight.
    #[error("backend crashed")]
    Crashed,
    /// `faults.cut_after_tokens` ended the stream after `after` tokens (speech: chunks).
    #[error("stream cut after {after} tokens")]
    Cut { after: u32 },
    /// The caller's input is one the simulator refuses: audio that is malformed, empty or too
    /// long, speech text too long, too many or too large embedding inputs, bad dimensions.
    /// Raised before the request queues, so it costs no slot, no time and no request number.
    /// A 400: `param` names the request field, `code` says what is wrong with it.
    #[error("{message}")]
    InvalidInput { param: &'static str, code: &'static str, message: String },
}

impl SimError {
    /// A stable machine-readable name, used as the OpenAI error `code` and in telemetry.
    pub fn code(&self) -> &'static str {
        match self {
            SimError::UnknownModel(_) => "model_not_found",
            SimError::ContextLengthExceeded { .. } => "context_length_exceeded",
            SimError::Overloaded { .. } => "overloaded",
            SimError::Injected => "injected_error",
            SimError::Refused => "backend_refused",
            SimError::Crashed => "backend_crashed",
            SimError::Cut { .. } => "stream_cut",
            SimError::InvalidInput { code, .. } => code,
        }
    }

    /// The request field the error is about, when it is the caller's: `model` for an
    /// unknown model, `messages` for a prompt beyond the context window, the named field of
    /// an invalid input; `None` for the backend's own failures.
    pub fn param(&self) -> Option<&'static str> {
        match self {
            SimError::UnknownModel(_) => Some("model"),
            SimError::ContextLengthExceeded { .. } => Some("messages"),
            SimError::InvalidInput { param, .. } => Some(param),
            _ => None,
        }
    }

    pub(crate) fn invalid(
        param: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        SimError::InvalidInput { param, code, message: message.into() }
    }
}

/// OpenAI's wording (vLLM uses the same): with a completion budget, the total and its two
/// parts; without one, the prompt alone.
fn context_message(window: &u32, prompt: &u32, requested: &Option<u32>) -> String {
    match requested {
        Some(c) => format!(
            "This model's maximum context length is {window} tokens. However, you requested \
             {} tokens ({prompt} in the messages, {c} in the completion). Please reduce the \
             length of the messages or completion.",
            u64::from(*prompt) + u64::from(*c)
        ),
        None => format!(
            "This model's maximum context length is {window} tokens. However, your messages \
             resulted in {prompt} tokens. Please reduce the length of the messages."
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_length_messages_mirror_openai() {
        let e = SimError::ContextLengthExceeded {
            model: "m".into(),
            window: 8192,
            prompt_tokens: 8000,
            requested: Some(1000),
        };
        assert_eq!(
            e.to_string(),
            "This model's maximum context length is 8192 tokens. However, you requested 9000 \
             tokens (8000 in the messages, 1000 in the completion). Please reduce the length of \
             the messages or completion."
        );
        assert_eq!(e.code(), "context_length_exceeded");
        // The total cannot overflow, however large the budget.
        let e = SimError::ContextLengthExceeded {
            model: "m".into(),
            window: 10,
            prompt_tokens: u32::MAX,
            requested: Some(u32::MAX),
        };
        assert!(e.to_string().contains("you requested 8589934590 tokens"), "{e}");
        let e = SimError::ContextLengthExceeded {
            model: "m".into(),
            window: 512,
            prompt_tokens: 600,
            requested: None,
        };
        assert_eq!(
            e.to_string(),
            "This model's maximum context length is 512 tokens. However, your messages resulted \
             in 600 tokens. Please reduce the length of the messages."
        );
    }
}
