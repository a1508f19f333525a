//! A chat completion request body as a client sends it: parsed the way the gateway parses it
//! (`edgeroute_http::json::parse_json`), validated, checked against the node's default ceilings
//! and stripped of fields no backend may see.
//!
//! Properties: nothing panics; after `drop_unknown_fields` only OpenAI's fields and the
//! configured extras remain; a request that parsed re-encodes to JSON that parses again and
//! gets the same verdicts.

#![no_main]

use edgeroute_http::json::parse_json;
use edgeroute_node::config::Limits;
use edgeroute_node::gateway::admission::{OPENAI_CHAT_FIELDS, check_ceilings, drop_unknown_fields};
use edgeroute_proto::ChatCompletionRequest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(mut req) = parse_json::<ChatCompletionRequest>(data) else { return };
    let valid = req.validate().is_ok();
    let limits = Limits::default();
    let within = check_ceilings(&req, &limits).is_ok();

    let extra = ["chat_template_kwargs".to_owned()];
    let before = req.extra.len();
    let dropped = drop_unknown_fields(&mut req, &extra);
    assert_eq!(before - dropped, req.extra.len());
    assert!(
        req.extra.keys().all(|k| OPENAI_CHAT_FIELDS.contains(&k.as_str()) || extra.contains(k)),
        "a field outside OpenAI's set and the extras survived"
    );

    // What the gateway forwards upstream is this request re-encoded: it must parse again.
    let json = serde_json::to_vec(&req).expect("a parsed request encodes");
    let again = parse_json::<ChatCompletionRequest>(&json)
        .unwrap_or_else(|e| panic!("re-encoded request does not parse: {e}"));
    assert_eq!(again.validate().is_ok(), valid);
    assert_eq!(check_ceilings(&again, &limits).is_ok(), within);
    assert_eq!(again.messages.len(), req.messages.len());
    assert_eq!(again.extra.len(), req.extra.len());
});
