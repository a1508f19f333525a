//! The node's chat-template inputs: a GGUF model's metadata (the chat template and special
//! tokens, read by `backend::gguf::parse` from an untrusted file) and a client's messages
//! rendered through real templates (`backend::template::ChatTemplate`), including the
//! continuation prompt that resumes a partial answer.
//!
//! Input: byte 0 picks the mode.
//! - even: the rest is a GGUF file. A template it carries is compiled (not rendered: templates
//!   come from the operator's model files, and rendering arbitrary Jinja is minijinja's
//!   concern, unbounded by design).
//! - odd: byte 1 picks a template, bit 0 of byte 0's upper half `add_generation_prompt`; the
//!   rest is messages separated by 0x00, each a role byte then its text (0x01 inside a text
//!   splits it into content parts).
//!
//! Properties: nothing panics; a continuation prompt ends with the partial answer (less its
//! leading whitespace, which trimming templates drop).

#![no_main]

use edgeroute_node::backend::gguf;
use edgeroute_node::backend::template::ChatTemplate;
use edgeroute_proto::chat::{ChatMessage, Content, ContentPart, Role};
use libfuzzer_sys::fuzz_target;
use serde_json::Map;

/// SmolLM2-Instruct's template, as its GGUF carries it.
const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Llama-3 style: trims content, uses bos_token, raises on unknown roles.
const LLAMA3: &str = "{{ bos_token }}{% for message in messages %}{% if message['role'] not in ['user', 'assistant', 'system'] %}{{ raise_exception('bad role') }}{% endif %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

/// Mistral style: alternation enforced, system folded into the first user turn, Python methods.
const MISTRAL: &str = "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'].strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% elif message['role'] == 'system' %}{{ '<<SYS>>' + message['content'] + '<</SYS>>' }}{% else %}{{ raise_exception('Only user, system and assistant roles are supported!') }}{% endif %}{% endfor %}";

const ROLES: [Role; 6] =
    [Role::System, Role::Developer, Role::User, Role::Assistant, Role::Tool, Role::Function];

fn message(raw: &[u8]) -> ChatMessage {
    let (role, text) = raw.split_first().map_or((0, &[][..]), |(r, t)| (*r, t));
    let role = ROLES[usize::from(role) % ROLES.len()];
    let text = String::from_utf8_lossy(text);
    if !text.contains('\u{1}') {
        return ChatMessage::new(role, text);
    }
    let parts = text
        .split('\u{1}')
        .map(|t| ContentPart { kind: "text".into(), text: Some(t.into()), extra: Map::new() })
        .collect();
    ChatMessage { role, content: Some(Content::Parts(parts)), name: None, extra: Map::new() }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    if mode % 2 == 0 {
        if let Ok(meta) = gguf::parse(rest) {
            if let Some(source) = meta.chat_template {
                let _ = ChatTemplate::new(
                    source,
                    meta.bos_token.unwrap_or_default(),
                    meta.eos_token.unwrap_or_default(),
                );
            }
        }
        return;
    }
    let Some((&pick, rest)) = rest.split_first() else { return };
    let (source, bos, eos) = match pick % 3 {
        0 => (SMOLLM2, "", "<|im_end|>"),
        1 => (LLAMA3, "<|begin_of_text|>", "<|eot_id|>"),
        _ => (MISTRAL, "<s>", "</s>"),
    };
    let t = ChatTemplate::new(source.into(), bos.into(), eos.into()).expect("a known template");
    let messages: Vec<ChatMessage> = rest.split(|&b| b == 0).take(64).map(message).collect();
    let _ = t.render(&messages, mode & 0x10 != 0);
    if let Ok(prompt) = t.continuation_prompt(&messages) {
        let partial = messages.last().expect("a final message").text();
        assert!(
            prompt.ends_with(partial.trim_start()),
            "the continuation prompt {prompt:?} does not end with the partial answer {partial:?}"
        );
    }
});
