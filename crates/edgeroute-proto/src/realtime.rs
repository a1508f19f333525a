//! OpenAI's realtime event protocol (`/v1/realtime`, a WebSocket of JSON text frames), the
//! parts the fleet reads: an event's `type`, the conversation items a moved session replays,
//! and edgeroute's own event, the migrate hint.
//!
//! The node and the SDK never interpret audio: they forward events and keep the few facts a
//! move needs (the session's settings, the conversation's items as text, whether a response
//! is under way).

use serde_json::{Value, json};

use crate::MigrateHint;

/// The event a node sends when it asks the client to move the session (the migrate header's
/// fields, as JSON). Unknown to OpenAI's clients, which pass it through as an event.
pub const MIGRATE_EVENT: &str = "edgeroute.migrate";
/// The subprotocol a browser names to carry its key (`openai-insecure-api-key.<token>`), as
/// OpenAI's realtime API accepts it; the node answers with [`SUBPROTOCOL`].
pub const KEY_SUBPROTOCOL_PREFIX: &str = "openai-insecure-api-key.";
/// The subprotocol the node selects when the client offers it.
pub const SUBPROTOCOL: &str = "realtime";
/// The WebSocket close code a node sends when it stops serving a session it asked to move
/// (RFC 6455's 1012, "service restart").
pub const CLOSE_MOVED: u16 = 1012;
/// The close code for the backend's failure under a session (1011, "internal error").
pub const CLOSE_BACKEND_FAILED: u16 = 1011;
/// The close code for a session past its limits (1008, "policy violation").
pub const CLOSE_POLICY: u16 = 1008;

/// An event's `type`, if it has one.
pub fn event_type(v: &Value) -> Option<&str> {
    v.get("type").and_then(Value::as_str)
}

/// The migrate event for `hint`.
pub fn migrate_event(event_id: &str, hint: &MigrateHint) -> Value {
    let mut v = json!({
        "type": MIGRATE_EVENT,
        "event_id": event_id,
        "reason": hint.reason,
        "deadline_ms": hint.deadline_ms,
    });
    if let Some(to) = &hint.to {
        v["to"] = to.clone().into();
    }
    if let Some(m) = &hint.model {
        v["model"] = m.clone().into();
    }
    v
}

/// The hint a migrate event carries (`None` for any other event or a malformed one).
pub fn parse_migrate(v: &Value) -> Option<MigrateHint> {
    if event_type(v) != Some(MIGRATE_EVENT) {
        return None;
    }
    Some(MigrateHint {
        reason: v.get("reason")?.as_str()?.to_owned(),
        deadline_ms: v.get("deadline_ms")?.as_u64()?,
        to: v.get("to").and_then(Value::as_str).map(str::to_owned),
        model: v.get("model").and_then(Value::as_str).map(str::to_owned),
    })
}

/// An `error` event in OpenAI's shape: `kind` is `invalid_request_error` or `server_error`.
pub fn error_event(
    event_id: &str,
    kind: &str,
    code: &str,
    message: &str,
    param: Option<&str>,
    client_event_id: Option<&str>,
) -> Value {
    json!({
        "type": "error",
        "event_id": event_id,
        "error": {
            "type": kind,
            "code": code,
            "message": message,
            "param": param,
            "event_id": client_event_id,
        }
    })
}

/// A conversation item reduced to what a replay needs: its role and its text (a typed or
/// transcribed input, an answer's text or its audio's transcript).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextItem {
    pub id: Option<String>,
    pub role: String,
    pub text: String,
}

impl TextItem {
    /// The message item an event carries (`item`), as text; `None` for items that are not
    /// messages (function calls are replayed as they came, see [`replayable`]) or carry no
    /// text yet (audio whose transcript has not arrived).
    pub fn of(item: &Value) -> Option<TextItem> {
        if item.get("type").and_then(Value::as_str) != Some("message") {
            return None;
        }
        let role = item.get("role")?.as_str()?.to_owned();
        let mut text = String::new();
        for part in item.get("content")?.as_array()? {
            let piece = part
                .get("text")
                .and_then(Value::as_str)
                .or_else(|| part.get("transcript").and_then(Value::as_str));
            if let Some(p) = piece {
                if !text.is_empty() && !p.is_empty() {
                    text.push(' ');
                }
                text.push_str(p);
            }
        }
        if text.is_empty() {
            return None;
        }
        let id = item.get("id").and_then(Value::as_str).map(str::to_owned);
        Some(TextItem { id, role, text })
    }

    /// The `conversation.item.create` event that recreates this item on another server: the
    /// user's and system's words as `input_text`, the assistant's as `text`.
    pub fn create_event(&self, event_id: &str) -> Value {
        let kind = if self.role == "assistant" { "text" } else { "input_text" };
        let mut item = json!({
            "type": "message",
            "role": self.role,
            "content": [{ "type": kind, "text": self.text }],
        });
        if let Some(id) = &self.id {
            item["id"] = id.clone().into();
        }
        json!({ "type": "conversation.item.create", "event_id": event_id, "item": item })
    }
}

/// Whether an item that is not a message (a function call or its output) can be replayed as
/// it came.
pub fn replayable(item: &Value) -> bool {
    matches!(
        item.get("type").and_then(Value::as_str),
        Some("function_call" | "function_call_output")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_migrate_event_carries_the_hint_and_parses_back() {
        let hint = MigrateHint {
            reason: "drain".into(),
            deadline_ms: 30_000,
            to: Some("tor-2".into()),
            model: None,
        };
        let v = migrate_event("ev_1", &hint);
        assert_eq!(event_type(&v), Some(MIGRATE_EVENT));
        assert_eq!(parse_migrate(&v), Some(hint));
        assert_eq!(parse_migrate(&json!({"type": "session.created"})), None);
        assert_eq!(parse_migrate(&json!({"type": MIGRATE_EVENT, "reason": "x"})), None);
    }

    #[test]
    fn items_reduce_to_text_and_replay_as_their_role_speaks() {
        let heard = json!({"id": "item_1", "type": "message", "role": "user",
            "content": [{"type": "input_audio", "transcript": "Hello there."}]});
        let t = TextItem::of(&heard).unwrap();
        assert_eq!(t.text, "Hello there.");
        let ev = t.create_event("e");
        assert_eq!(ev["item"]["content"][0]["type"], "input_text");
        assert_eq!(ev["item"]["id"], "item_1");
        let said = json!({"type": "message", "role": "assistant",
            "content": [{"type": "audio", "transcript": "Hi."}, {"type": "text", "text": "Ok"}]});
        let t = TextItem::of(&said).unwrap();
        assert_eq!(t.text, "Hi. Ok");
        assert_eq!(t.create_event("e")["item"]["content"][0]["type"], "text");
        // No transcript yet, or not a message: nothing to replay as text.
        let pending = json!({"type": "message", "role": "user",
            "content": [{"type": "input_audio", "transcript": null}]});
        assert_eq!(TextItem::of(&pending), None);
        let call = json!({"type": "function_call", "name": "f", "arguments": "{}"});
        assert_eq!(TextItem::of(&call), None);
        assert!(replayable(&call));
    }

    #[test]
    fn errors_have_openais_shape() {
        let e = error_event("ev", "invalid_request_error", "invalid_json", "bad", None, None);
        assert_eq!(e["type"], "error");
        assert_eq!(e["error"]["code"], "invalid_json");
        assert!(e["error"]["param"].is_null());
    }
}
