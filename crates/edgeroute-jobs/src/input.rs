//! Batch input and result lines. The input is OpenAI's JSONL, one request a line:
//! `{"custom_id": "...", "method": "POST", "url": "/v1/chat/completions", "body": {...}}`,
//! checked whole before a job exists (a bad line refuses the file, naming the line). Result
//! lines follow OpenAI's output format: `{"id", "custom_id", "response", "error"}`, where
//! `response` is `{"status_code", "body"}` for answered requests and `error` is
//! `{"code", "message"}` for the others.
//!
//! Limits are explicit ([`Limits`]): lines, items, bytes; nothing here reads unbounded input.

use crate::lifecycle::ItemError;
use crate::store::{Limits, NewItem};

/// Why an input file was refused. Lines are 1-based.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    /// The file has no request.
    #[error("the input file holds no request")]
    Empty,
    /// More requests than `max_items_per_job`.
    #[error("the input file holds more than {max} requests (limit max_items_per_job)")]
    TooManyItems {
        /// The limit.
        max: usize,
    },
    /// A line longer than `max_line_bytes`.
    #[error("line {line} is longer than {max} bytes (limit max_line_bytes)")]
    LineTooLong {
        /// The line.
        line: usize,
        /// The limit.
        max: usize,
    },
    /// A line that is not UTF-8 JSON of the expected shape.
    #[error("line {line}: {message}")]
    Malformed {
        /// The line.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// Two lines with one `custom_id`: results are keyed by it, so it must be unique.
    #[error("line {line}: custom_id {custom_id:?} was already used on line {first}")]
    DuplicateCustomId {
        /// The line.
        line: usize,
        /// The id.
        custom_id: String,
        /// Where it was first used.
        first: usize,
    },
    /// A request for another endpoint than the batch's.
    #[error("line {line}: url {url:?} is not the batch's endpoint {endpoint:?}")]
    WrongEndpoint {
        /// The line.
        line: usize,
        /// The line's url.
        url: String,
        /// The batch's endpoint.
        endpoint: String,
    },
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    custom_id: String,
    method: String,
    url: String,
    body: serde_json::Map<String, serde_json::Value>,
}

/// Parses and checks a batch input file for `endpoint`.
pub fn parse(bytes: &[u8], endpoint: &str, limits: &Limits) -> Result<Vec<NewItem>, InputError> {
    let mut items: Vec<NewItem> = Vec::new();
    let mut seen = std::collections::HashMap::new();
    for (index, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = index + 1;
        if raw.len() > limits.max_line_bytes {
            return Err(InputError::LineTooLong { line, max: limits.max_line_bytes });
        }
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if items.len() == limits.max_items_per_job {
            return Err(InputError::TooManyItems { max: limits.max_items_per_job });
        }
        let parsed: Line = serde_json::from_slice(raw)
            .map_err(|e| InputError::Malformed { line, message: e.to_string() })?;
        if parsed.custom_id.is_empty() {
            return Err(InputError::Malformed { line, message: "custom_id is empty".into() });
        }
        if parsed.method != "POST" {
            let message = format!("method {:?}: only POST is batched", parsed.method);
            return Err(InputError::Malformed { line, message });
        }
        if parsed.url != endpoint {
            let (url, endpoint) = (parsed.url, endpoint.to_owned());
            return Err(InputError::WrongEndpoint { line, url, endpoint });
        }
        if let Some(&first) = seen.get(&parsed.custom_id) {
            return Err(InputError::DuplicateCustomId { line, custom_id: parsed.custom_id, first });
        }
        seen.insert(parsed.custom_id.clone(), line);
        let body = serde_json::Value::Object(parsed.body).to_string();
        items.push(NewItem { custom_id: parsed.custom_id, body });
    }
    if items.is_empty() {
        return Err(InputError::Empty);
    }
    Ok(items)
}

/// The stored `response` of an answered item: `{"status_code", "body"}`.
pub fn response_json(status_code: u16, body: &serde_json::Value) -> String {
    serde_json::json!({ "status_code": status_code, "body": body }).to_string()
}

/// The stored `error` of an item.
pub fn error_json(error: &ItemError) -> String {
    serde_json::json!({ "code": error.code, "message": error.message }).to_string()
}

/// One result line (output or error file) from the stored parts, which this crate wrote and
/// which are therefore valid JSON.
pub fn result_line(
    job_id: &str,
    index: u64,
    custom_id: &str,
    response: Option<&str>,
    error: Option<&str>,
) -> String {
    let quote = |s: &str| serde_json::Value::from(s).to_string();
    format!(
        "{{\"id\":{},\"custom_id\":{},\"response\":{},\"error\":{}}}\n",
        quote(&format!("{job_id}_req_{index}")),
        quote(custom_id),
        response.unwrap_or("null"),
        error.unwrap_or("null"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits { max_items_per_job: 3, max_line_bytes: 200, ..Limits::default() }
    }

    const EP: &str = "/v1/chat/completions";

    fn line(id: &str) -> String {
        format!(r#"{{"custom_id":"{id}","method":"POST","url":"{EP}","body":{{"model":"m"}}}}"#)
    }

    #[test]
    fn a_valid_file_gives_its_items_in_order_and_skips_blank_lines() {
        let file = format!("{}\n\n{}\n", line("a"), line("b"));
        let items = parse(file.as_bytes(), EP, &limits()).unwrap();
        let ids: Vec<&str> = items.iter().map(|i| i.custom_id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        assert_eq!(items[0].body, r#"{"model":"m"}"#);
    }

    #[test]
    fn every_bad_file_is_refused_naming_its_line() {
        let dup = format!("{}\n{}", line("a"), line("a"));
        assert_eq!(
            parse(dup.as_bytes(), EP, &limits()),
            Err(InputError::DuplicateCustomId { line: 2, custom_id: "a".into(), first: 1 })
        );
        let many = [line("a"), line("b"), line("c"), line("d")].join("\n");
        assert_eq!(parse(many.as_bytes(), EP, &limits()), Err(InputError::TooManyItems { max: 3 }));
        let long = format!("{}\n{}", line("a"), "x".repeat(201));
        assert_eq!(
            parse(long.as_bytes(), EP, &limits()),
            Err(InputError::LineTooLong { line: 2, max: 200 })
        );
        assert!(matches!(
            parse(line("a").as_bytes(), "/v1/embeddings", &limits()),
            Err(InputError::WrongEndpoint { line: 1, .. })
        ));
        assert!(matches!(
            parse(b"{\"custom_id\":1}", EP, &limits()),
            Err(InputError::Malformed { line: 1, .. })
        ));
        assert_eq!(parse(b"\n \n", EP, &limits()), Err(InputError::Empty));
    }

    #[test]
    fn result_lines_are_json_keyed_by_custom_id() {
        let r = response_json(200, &serde_json::json!({"x": 1}));
        let l = result_line("batch_1", 0, "q\"1", Some(&r), None);
        let v: serde_json::Value = serde_json::from_str(&l).unwrap();
        assert_eq!(v["custom_id"], "q\"1");
        assert_eq!(v["id"], "batch_1_req_0");
        assert_eq!(v["response"]["body"]["x"], 1);
        assert!(v["error"].is_null());
    }
}
