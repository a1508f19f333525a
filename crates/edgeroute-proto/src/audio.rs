//! The wire values of OpenAI's audio endpoints that more than one component reads.

/// `response_format` of a transcription or translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TranscriptFormat {
    Json,
    Text,
    VerboseJson,
    Srt,
    Vtt,
}

impl TranscriptFormat {
    /// The format a `response_format` value names; `None` for any other.
    pub fn parse(s: &str) -> Option<TranscriptFormat> {
        Some(match s {
            "json" => TranscriptFormat::Json,
            "text" => TranscriptFormat::Text,
            "verbose_json" => TranscriptFormat::VerboseJson,
            "srt" => TranscriptFormat::Srt,
            "vtt" => TranscriptFormat::Vtt,
            _ => return None,
        })
    }
}
