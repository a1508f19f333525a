//! Why a simulated request failed.
//!
//! The variants map one to one onto what a real backend does wrong, so the gateway can tell a
//! client error (unknown model) from backend trouble (overload, injected error, refusal,
//! crash, cut stream). Which HTTP status each becomes is the caller's decision; the
//! standalone server's choice is in `server`.

/// A simulated request's failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SimError {
    /// No model with this id is loaded.
    #[error("the model `{0}` does not exist or is not loaded")]
    UnknownModel(String),
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
    /// `faults.cut_after_tokens` ended the stream after `after` tokens.
    #[error("stream cut after {after} tokens")]
    Cut { after: u32 },
}

impl SimError {
    /// A stable machine-readable name, used as the OpenAI error `code` and in telemetry.
    pub fn code(&self) -> &'static str {
        match self {
            SimError::UnknownModel(_) => "model_not_found",
            SimError::Overloaded { .. } => "overloaded",
            SimError::Injected => "injected_error",
            SimError::Refused => "backend_refused",
            SimError::Crashed => "backend_crashed",
            SimError::Cut { .. } => "stream_cut",
        }
    }
}
