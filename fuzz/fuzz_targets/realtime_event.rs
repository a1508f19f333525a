//! Realtime events (`/v1/realtime`) as the SDK and the node read them from the other side of a
//! WebSocket: any JSON text, its `type`, the migrate hint it may carry, and a conversation
//! item reduced to text for a replay (`edgeroute_proto::realtime`).
//!
//! Properties: nothing panics; a migrate event written from a parsed hint parses back to the
//! same hint; an item's text replays as an item whose text and role are the same.

#![no_main]

use edgeroute_proto::realtime::{TextItem, event_type, migrate_event, parse_migrate, replayable};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    let _ = event_type(&v);
    if let Some(hint) = parse_migrate(&v) {
        assert_eq!(parse_migrate(&migrate_event("e", &hint)), Some(hint));
    }
    for item in [v.get("item").unwrap_or(&v), &v] {
        let _ = replayable(item);
        if let Some(t) = TextItem::of(item) {
            assert!(!t.text.is_empty());
            let ev = t.create_event("e");
            let again = TextItem::of(&ev["item"]).expect("a replayed item has its text");
            assert_eq!((again.role.as_str(), again.text.as_str()), (t.role.as_str(), t.text.as_str()));
        }
    }
});
